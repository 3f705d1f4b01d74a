"""The shared tester: ONE small audit run through every execution mode, and the comparisons that
must hold between any two of them (DESIGN.md §2: "The three must agree to 1e-6 relative").

The audit: sklearn's 8×8 digits as PNG-in-Parquet on the session's S3 endpoint (240 "train" and
160 held-out "test" digits), K = 4 checkpoints of a tiny CNN (``tests/digits.py``), windows
early/late/all, targets logit + softmax, ``label: true``. The modes (:data:`MODES`):

* ``single`` — ``vog_ray.score`` in this process, per split (class normalisation is per split);
* ``fused`` — the Ray audit with its defaults (one actor holds all checkpoints);
* ``sharded`` — ``compute.checkpoint_groups: 2`` (partial pixel moments merged by example id);
  also one read block and batch 100 (results must not depend on them either);
* ``incremental`` — the first 3 checkpoints published and audited, then the 4th folded in (every
  window needs at least 2 checkpoints: ``late`` = ``"1:"`` of 3 holds 2).

:class:`DigitsAudit` (the session fixture ``digits_audit``, ``tests/distributed/conftest.py``)
holds the data and memoises every audit, so the modules that use it (test_modes, test_audit,
test_incremental, test_multinode) pay for each audit once per session. The windows do not slide
(``late`` is ``"1:"``, the last 3 of K = 4), so the incremental mode runs the very same config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tests.digits import MODEL, K, audit_config, digit_images, to_input, upload_checkpoints

__all__ = ["MODES", "WINDOWS", "RESOLVED_WINDOWS", "TARGETS", "KEYS", "PRIMARY", "SPLITS", "RTOL", "FIGURES",
           "Scores", "DigitsAudit", "Incremental", "assert_same_scores", "assert_same_classes",
           "assert_same_signals", "assert_modes_agree", "publish_checkpoint", "parquet_ids"]

MODES = ("single", "fused", "sharded", "incremental")
WINDOWS = {"early": "first:2", "late": "1:", "all": "all"}
RESOLVED_WINDOWS = {"early": [0, 1], "late": [1, 2, 3], "all": [0, 1, 2, 3]}
TARGETS = ["logit", "softmax"]
KEYS = [f"{w}_{t}" for w in WINDOWS for t in TARGETS]
PRIMARY = "late_logit"
SPLITS = ("train", "test")
ROWS = {"train": np.arange(0, 240),       # the checkpoints were trained on digits 0..599
        "test": np.arange(1500, 1660)}    # held out
ROWS_PER_FILE = 100
ROW_GROUP = 20
RTOL = 1e-6
# the compute settings every Ray audit starts from. cpus_per_actor 0.25: up to 3 actor pools
# (checkpoint groups) must leave a whole CPU for the read / decode tasks, or Ray Data waits for it
# forever (seen: 3 x 0.5 on 2 CPUs)
BASE_COMPUTE = {"device": "cpu", "batch_size": 64, "cpus_per_actor": 0.25}
MODE_COMPUTE = {"fused": {}, "sharded": {"checkpoint_groups": 2, "read_blocks": 1, "batch_size": 100}}
INCREMENTAL_STEPS = ((0, 3), (3, 4))  # the checkpoints (index ranges) published before each run
FIGURES: dict[str, float] = {}         # measured maxima, printed when the session ends (pytest -s)


def parquet_ids(n: int) -> list[str]:
    """The ids the Parquet reader gives the rows of a split written by ``write_parquet_split``."""
    return [f"part-{i // ROWS_PER_FILE:05d}.parquet:{i % ROWS_PER_FILE}" for i in range(n)]


def publish_checkpoint(s3, src_key: str, live: str, epoch: int) -> None:
    """What a training run does: one more ``epoch_<n>.pt`` appears under the live prefix."""
    s3.client().copy_object(Bucket=s3.bucket, Key=f"{live}/epoch_{epoch}.pt",
                            CopySource={"Bucket": s3.bucket, "Key": src_key})


@dataclass
class Scores:
    """One audit's results as compared across modes: per split, the score table sorted by id and
    the class table sorted by class; the manifest and run URL when it was published."""

    tables: dict[str, pa.Table]
    classes: dict[str, pa.Table]
    manifest: dict[str, Any] | None = None
    run_url: str | None = None

    @classmethod
    def of_run(cls, run_url: str, storage) -> "Scores":
        from vog_ray.runs import open_run

        run = open_run(run_url, storage)
        t, c = run.scores(), run.classes()
        splits = sorted(set(t["split"].to_pylist()))
        return cls({s: t.filter(pc.equal(t["split"], s)).sort_by("id") for s in splits},
                   {s: c.filter(pc.equal(c["split"], s)).sort_by("class") for s in splits},
                   run.manifest, run_url)


@dataclass
class Incremental:
    """The incremental mode's runs: checkpoints appear under ``live`` (a key prefix), each run
    publishes under ``out``; ``results[g]`` / ``states[g]`` after generation g + 1."""

    live: str
    out: str
    config: dict[str, Any]
    results: list[Any] = field(default_factory=list)
    states: list[dict[str, Any]] = field(default_factory=list)


class DigitsAudit:
    """The data and checkpoints of the shared audit on S3, and every audit of them, memoised."""

    def __init__(self, s3, checkpoints, ray):
        from vog_ray.testing.writers import write_parquet_split

        self.s3, self.ray = s3, ray
        self.imgs, self.labels = digit_images()
        self.train_error = checkpoints.train_error
        for split, idx in ROWS.items():
            write_parquet_split(s3.url(f"digits/{split}"), self.imgs[idx], self.labels[idx], storage=s3.storage,
                                rows_per_file=ROWS_PER_FILE, row_group_size=ROW_GROUP)
        self.splits = {s: {"format": "parquet", "url": s3.url(f"digits/{s}")} for s in ROWS}
        self.ckpt_glob = upload_checkpoints(checkpoints.paths, s3.url("ckpt"), s3.storage)
        self.ckpt_keys = [f"ckpt/epoch_{i}.pt" for i in range(1, K + 1)]
        self._audits: dict[str, tuple[dict, Any]] = {}
        self._references: dict[tuple, Scores] = {}
        self._incremental: Incremental | None = None

    @property
    def storage(self):
        """Test-side storage (carries the dummy credentials explicitly)."""
        return self.s3.storage

    def config(self, name: str, *, out: str | None = None, splits: dict | None = None, checkpoints: Any = None,
               vog: dict | None = None, compute: dict | None = None, **sections: Any) -> dict[str, Any]:
        """The shared audit's config dict, written to ``out`` (default ``out/<name>``) on the bucket."""
        return audit_config(name=name, splits=splits or self.splits, out_url=self.s3.url(out or f"out/{name}"),
                            checkpoints=checkpoints or self.ckpt_glob,
                            vog={"windows": dict(WINDOWS), "targets": list(TARGETS), **(vog or {})},
                            compute={**BASE_COMPUTE, **(compute or {})},
                            storage={"endpoint_url": self.s3.endpoint}, **sections)

    def audit(self, name: str, *, compute: dict | None = None, vog: dict | None = None):
        """The (memoised) ``AuditResult`` of ``config(name, compute=…, vog=…)``; every name has its
        own output URL, so no audit resumes another's work."""
        from vog_ray.config import validate
        from vog_ray.distributed.audit import run_audit

        overrides = {"compute": compute or {}, "vog": vog or {}}
        if name not in self._audits:
            self.ray.ensure()
            cfg = validate(self.config(name, **overrides), f"<{name}>")
            self._audits[name] = (overrides, run_audit(cfg))
        was, result = self._audits[name]
        assert was == overrides, f"audit {name!r} was memoised with other settings: {was} != {overrides}"
        return result

    def reference(self, accum_dtype: str = "float32", label_mode: str = "true") -> Scores:
        """``vog_ray.score`` in this process, split by split (memoised)."""
        import vog_ray

        key = (accum_dtype, label_mode)
        if key not in self._references:
            tables, classes = {}, {}
            for split, idx in ROWS.items():
                t, c = vog_ray.score(
                    to_input(self.imgs[idx]), self.labels[idx], model=dict(MODEL),
                    checkpoints=self.ckpt_glob, storage=self.storage, windows=WINDOWS, targets=TARGETS,
                    label_mode=label_mode, device="cpu", batch_size=64, ids=parquet_ids(len(idx)), split=split,
                    accum_dtype=accum_dtype, return_classes=True)
                tables[split], classes[split] = t.sort_by("id"), c.sort_by("class")
            self._references[key] = Scores(tables, classes)
        return self._references[key]

    def incremental(self) -> Incremental:
        """The first 3 checkpoints published and audited, then the 4th folded in (memoised)."""
        from vog_ray.config import validate
        from vog_ray.distributed.incremental import read_state, run_incremental

        if self._incremental is None:
            live, out = "inc/ckpt", "out/incremental"
            cfg = self.config("incremental", out=out, checkpoints=self.s3.url(f"{live}/epoch_*.pt"))
            inc = Incremental(live, out, cfg)
            self.ray.ensure()
            for start, stop in INCREMENTAL_STEPS:
                for i in range(start, stop):
                    publish_checkpoint(self.s3, self.ckpt_keys[i], live, i + 1)
                res = run_incremental(validate(cfg, "<incremental>"))
                assert res is not None, f"checkpoints {start}..{stop - 1} were new"
                inc.results.append(res)
                inc.states.append(read_state(self.s3.url(f"{out}/_incremental"), self.storage))
            self._incremental = inc
        return self._incremental

    def mode(self, mode: str) -> Scores:
        """The shared audit's results in one of :data:`MODES`."""
        if mode == "single":
            return self.reference()
        if mode == "incremental":
            return Scores.of_run(self.incremental().results[-1].run_url, self.storage)
        return Scores.of_run(self.audit(mode, compute=MODE_COMPUTE[mode]).run_url, self.storage)


# ----------------------------------------------------------------------------------------------
# comparisons: ``a`` is the reference


def col(t: pa.Table, c: str) -> np.ndarray:
    return np.asarray(t[c].to_pylist(), dtype=np.float64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / |a| (raw VoG is positive)."""
    return float(np.max(np.abs(a - b) / np.abs(a)))


def record(name: str, value: float) -> float:
    FIGURES[name] = max(FIGURES.get(name, 0.0), value)
    return value


def z_scale(t: pa.Table, k: str) -> np.ndarray:
    """The scale a rounding error of z is relative to: z = (v - m_c) / s_c, so relative errors e
    of v, m_c and s_c move z by up to e·(|v| + |m_c|) / s_c + e·|z|. VoG/s_c is ~3–10 here (a
    class's VoG spread is a fraction of its mean): a 1e-7 relative change of raw VoG moves z by
    ~1e-6 absolute. z is compared relative to this scale (and near 0, where |z| alone would make
    any difference infinitely large in relative terms)."""
    v, z = col(t, f"vog_{k}"), col(t, f"z_{k}")
    cls = np.asarray(t["target_label"].to_pylist())
    m, s = np.zeros_like(v), np.ones_like(v)
    for c in np.unique(cls):
        sel = cls == c
        m[sel], s[sel] = v[sel].mean(), v[sel].std()
    with np.errstate(divide="ignore"):  # s_c = 0 (a one-example class): z is 0 on both sides
        return np.abs(z) + np.where(s > 0, (np.abs(v) + np.abs(m)) / s, np.inf)


def order_violation(ref_score: np.ndarray, got_rank: np.ndarray, groups: np.ndarray) -> float:
    """Largest amount by which ``got``'s order (by rank, within each group) contradicts the
    reference scores: 0 when the orders agree; > 0 only for pairs ranked the other way round."""
    worst = 0.0
    for g in np.unique(groups):
        sel = groups == g
        s = ref_score[sel][np.argsort(got_rank[sel], kind="stable")]
        if len(s) > 1:
            worst = max(worst, float(np.max(s[1:] - np.minimum.accumulate(s)[:-1])))
    return worst


def assert_same_scores(a: Scores, b: Scores, tag: str, *, keys=KEYS, z: bool = True, ranks: bool = True,
                       z_tol: float = RTOL) -> None:
    """Raw VoG within 1e-6 relative; z within 1e-6 relative to its scale (:func:`z_scale`); ranks
    identical — except that two examples whose reference scores differ by less than the z
    tolerance may swap (float32 kernels can legitimately round them apart; the number of such
    swaps is recorded, and is 0 in every run so far)."""
    assert sorted(a.tables) == sorted(b.tables) and a.tables, (tag, sorted(a.tables), sorted(b.tables))
    for split in a.tables:
        ta, tb = a.tables[split], b.tables[split]
        assert ta.num_rows == tb.num_rows > 0, (tag, split)
        assert ta["id"].to_pylist() == tb["id"].to_pylist(), (tag, split)
        for c in ("label", "target_label", "pred"):
            assert ta[c].to_pylist() == tb[c].to_pylist(), (tag, split, c)
        for k in keys:
            err = record(f"{tag}: raw vog rel", rel(col(ta, f"vog_{k}"), col(tb, f"vog_{k}")))
            assert err <= RTOL, (tag, split, k, err)
            if z:
                dz = np.abs(col(ta, f"z_{k}") - col(tb, f"z_{k}"))
                record(f"{tag}: z abs", float(dz.max()))
                err = record(f"{tag}: z rel to its scale", float(np.max(dz / z_scale(ta, k))))
                assert err <= z_tol, (tag, split, k, err)
        if ranks:
            _assert_same_ranks(ta, tb, tag, split, z_tol)


def _assert_same_ranks(ta: pa.Table, tb: pa.Table, tag: str, split: str, z_tol: float) -> None:
    ra, rb = np.asarray(ta["rank"].to_pylist()), np.asarray(tb["rank"].to_pylist())
    swaps = record(f"{tag}: ranks that differ", int(np.sum(ra != rb)))
    if swaps == 0:
        for c in ("class_rank", "decile"):
            assert ta[c].to_pylist() == tb[c].to_pylist(), (tag, split, c)
        np.testing.assert_allclose(col(ta, "percentile"), col(tb, "percentile"), rtol=0, atol=1e-12)
    else:  # only near-ties may swap
        tol = z_tol * float(np.max(z_scale(ta, PRIMARY)))
        score = col(ta, "score")
        assert order_violation(score, rb, np.zeros(len(rb))) <= tol, (tag, split, swaps)
        assert order_violation(score, np.asarray(tb["class_rank"].to_pylist()),
                               np.asarray(ta["target_label"].to_pylist())) <= tol, (tag, split)
    assert sorted(rb.tolist()) == list(range(1, len(rb) + 1))


def assert_same_classes(a: Scores, b: Scores, tag: str, *, keys=KEYS) -> None:
    """Per split: the same classes and counts, mean and std of raw VoG within 1e-6 relative."""
    for split in a.tables:
        ca, cb = a.classes[split], b.classes[split]
        assert ca["class"].to_pylist() == cb["class"].to_pylist() == list(range(10)), (tag, split)
        assert ca["count"].to_pylist() == cb["count"].to_pylist(), (tag, split)
        for k in keys:
            for p in ("mean", "std"):
                err = record(f"{tag}: class moments rel", rel(col(ca, f"{p}_{k}"), col(cb, f"{p}_{k}")))
                assert err <= RTOL, (tag, split, k, p, err)


# per-checkpoint signals come from the same forward pass of the same weights: equal up to float32
# rounding of another batch composition
SIGNAL_RTOL, SIGNAL_ATOL = 1e-5, 1e-6


def assert_same_signals(a: Scores, b: Scores, tag: str) -> None:
    """Every ``sig_*`` column: shape ``[n, K]`` in checkpoint order, floats within float32 rounding,
    integer signals (pred, correct) equal."""
    for split in a.tables:
        ta, tb = a.tables[split], b.tables[split]
        sigs = sorted(c for c in ta.column_names if c.startswith("sig_"))
        assert sigs and sigs == sorted(c for c in tb.column_names if c.startswith("sig_")), (tag, split)
        for s in sigs:
            x = np.asarray(ta[s].to_pylist(), np.float64)
            y = np.asarray(tb[s].to_pylist(), np.float64)
            assert x.shape == y.shape == (ta.num_rows, K), (tag, split, s, x.shape, y.shape)
            if s in ("sig_pred", "sig_correct"):
                np.testing.assert_array_equal(y, x, err_msg=f"{tag} {split} {s}")
            else:
                record(f"{tag}: signals rel", float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-3))))
                np.testing.assert_allclose(y, x, rtol=SIGNAL_RTOL, atol=SIGNAL_ATOL, err_msg=f"{tag} {split} {s}")


def assert_modes_agree(a: Scores, b: Scores, tag: str) -> None:
    """Scores (raw VoG, z, ranks), class tables and per-checkpoint signals of two modes agree."""
    assert_same_scores(a, b, tag)
    assert_same_classes(a, b, tag)
    assert_same_signals(a, b, tag)
