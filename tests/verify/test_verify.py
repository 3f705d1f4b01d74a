"""The run validator (``vog_ray.verify``) on small published runs written without Ray: a
consistent run passes every invariant, including its carried columns against the Parquet source
(nullable int64 above 2**53, strings with nulls); each kind of damage to the published tables is
found and named by its invariant; ``vog-ray verify`` exits 0 / 1 accordingly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.runfactory import synthetic_run

BIG = 2 ** 53 + 1  # not a float64: a round trip through float changes it


def _source(root: Path, n: int) -> tuple[str, list, list]:
    """A Parquet source with an id column and two carried columns (nulls anywhere)."""
    ids = [f"ex-{i:03d}" for i in range(n)]
    big = [None if i % 7 == 3 else BIG + 2 * i for i in range(n)]
    tag = [None if i % 5 == 0 else f"t{i}" for i in range(n)]
    d = root / "src"
    d.mkdir(parents=True)
    half = n // 2
    for k, sl in enumerate((slice(0, half), slice(half, n))):
        pq.write_table(pa.table({"id": ids[sl], "image": pa.array([b"x"] * len(ids[sl]), pa.binary()),
                                 "big": pa.array(big[sl], pa.int64()), "tag": pa.array(tag[sl], pa.string())}),
                       d / f"part-{k}.parquet")
    return str(d), big, tag


@pytest.fixture
def run(tmp_path):
    """A published run (2 score files) whose train split is read from a real Parquet source."""
    n = 40
    src, big, tag = _source(tmp_path, n)
    rng = np.random.default_rng(0)
    rows = {"train": {"id": [f"ex-{i:03d}" for i in range(n)], "label": list(np.arange(n) % 3),
                      "vog_late_logit": list(rng.random(n)), "big": pa.array(big, pa.int64()),
                      "tag": pa.array(tag, pa.string())}}
    url = synthetic_run(str(tmp_path / "out"), rows, split_specs={
        "train": {"format": "parquet", "url": src, "id_column": "id", "keep_columns": ["big", "tag"]}})
    return Path(url)


def _verify(url, **kw):
    from vog_ray.verify import verify_run

    return verify_run(str(url), **kw)


def test_a_consistent_run_passes_every_invariant(run):
    v = _verify(run)
    assert v.ok, v.problems
    from vog_ray.verify import INVARIANTS

    assert v.checked == list(INVARIANTS) and v.rows == 40 and v.source == "read"


def _edit(path: Path, fn) -> None:
    t = pq.read_table(path)
    pq.write_table(fn(t), path)


def _set(t: pa.Table, col: str, i: int, value, typ=None) -> pa.Table:
    vals = t[col].to_pylist()
    vals[i] = value
    return t.set_column(t.schema.get_field_index(col), col, pa.array(vals, typ or t.schema.field(col).type))


def _first_scores(run: Path) -> Path:
    return sorted((run / "scores").glob("*.parquet"))[0]


DAMAGE = {
    # invariant name: what is done to the published run
    "ranks": lambda r: _edit(_first_scores(r), lambda t: _set(t, "rank", 1, t["rank"][0].as_py())),
    "rank order": lambda r: _edit(_first_scores(r), lambda t: _set(_set(t, "rank", 0, 2), "rank", 1, 1)),
    "class ranks": lambda r: _edit(_first_scores(r), lambda t: _set(t, "class_rank", 1, 10 ** 6)),
    "z": lambda r: _edit(_first_scores(r), lambda t: _set(t, "z_late_logit", 2, t["z_late_logit"][2].as_py() + 1e-6)),
    "score": lambda r: _edit(_first_scores(r), lambda t: _set(t, "score", 3, 0.0)),
    "finite": lambda r: _edit(_first_scores(r), lambda t: _set(t, "vog_late_logit", 4, float("nan"))),
    "percentile": lambda r: _edit(_first_scores(r), lambda t: _set(t, "percentile", 5, 50.0)),
    "decile": lambda r: _edit(_first_scores(r), lambda t: _set(t, "decile", 5, 1)),
    "classes": lambda r: _edit(r / "classes.parquet", lambda t: _set(t, "std_late_logit", 0, t["std_late_logit"][0].as_py() * 1.01)),
    "rows": lambda r: (r / "manifest.json").write_text(json.dumps(
        {**json.loads((r / "manifest.json").read_text()), "splits": {"train": {"rows_in": 41, "rows_scored": 40,
                                                                              "rows_rejected": 0}}})),
    "carried columns": lambda r: _edit(_first_scores(r), lambda t: _set(t, "big", 1, 12345)),
    "ids": lambda r: _edit(_first_scores(r), lambda t: _set(t, "id", 0, "ex-999")),
}


@pytest.mark.parametrize("invariant", sorted(DAMAGE))
def test_damage_is_found_and_named(run, invariant):
    DAMAGE[invariant](run)
    v = _verify(run)
    assert not v.ok
    assert any(p.startswith(f"{invariant}:") for p in v.problems), v.problems


def test_a_carried_type_changed_is_named(run):
    """A nullable int64 column published as double (what a numpy round trip does): the values of
    the rows above 2**53 change, and the type differs from the source's."""
    def to_double(t):
        i = t.schema.get_field_index("big")
        return t.set_column(i, "big", t["big"].cast(pa.float64(), safe=False))

    for f in (run / "scores").glob("*.parquet"):
        _edit(f, to_double)
    v = _verify(run)
    assert any(p.startswith("carried columns: 'big' is double") for p in v.problems), v.problems
    assert any("values of 'big'" in p for p in v.problems), v.problems


def test_without_the_source_the_tables_are_still_checked(run):
    DAMAGE["ranks"](run)
    v = _verify(run, source=False)
    assert v.source == "skipped" and "carried columns" not in v.checked
    assert any(p.startswith("ranks:") for p in v.problems), v.problems


def test_cli_verify_exits_0_then_1(run, capsys):
    from vog_ray.cli import main

    assert main(["verify", str(run)]) == 0
    assert "ok: every invariant holds" in capsys.readouterr().out
    DAMAGE["z"](run)
    assert main(["verify", str(run)]) == 1
    cap = capsys.readouterr()
    assert "broken: z:" in cap.out and cap.err.startswith("error: run ") and cap.err.count("\n") == 1, cap


def test_a_file_summary_stays_small(tmp_path):
    """A summary holds counts, rank intervals and digests: its size does not grow with the rows."""
    from vog_ray.verify.summaries import RunContext, summarize_scores

    n = 200_000
    rank = np.arange(1, n + 1)
    t = pa.table({"id": [f"i{i}" for i in range(n)], "split": ["s"] * n, "target_label": np.zeros(n, np.int64),
                  "correct": np.ones(n, bool), "rank": rank, "class_rank": rank,
                  "percentile": 100.0 * (n - rank + 1) / n, "decile": 10 - (10 * (rank - 1)) // n,
                  "score": np.linspace(1, 0, n), "vog_a_logit": np.linspace(1, 0, n), "z_a_logit": np.linspace(1, 0, n)})
    path = tmp_path / "s.parquet"
    pq.write_table(t, path)
    ctx = RunContext(keys=["a_logit"], primary="a_logit", normalization="none", carried=[], split_sizes={"s": n},
                     lookup={}, means={"split": ["s"], "class": [0], "a_logit": [0.5]})
    out = summarize_scores(str(path), str(tmp_path), {}, ctx)
    assert out["problems"] == {} and out["ranks"]["s"][0][:2] == [1, n]
    assert len(json.dumps(out, default=str)) < 4000


def test_a_run_normalized_against_a_split_that_lacks_a_class(tmp_path):
    """``vog.normalize_against``: the rows of a class the reference split lacks have NaN z and null
    ranks — the validator accepts exactly that (ranks are a permutation of the ranked rows, the
    percentiles relative to them) and names a row of such a class that carries a rank."""
    rng = np.random.default_rng(1)
    rows = {"train": {"id": [f"tr-{i:02d}" for i in range(30)], "label": list(np.arange(30) % 3),
                      "vog_late_logit": list(rng.random(30))},
            "test": {"id": [f"te-{i:02d}" for i in range(20)], "label": list(np.arange(20) % 4),
                     "vog_late_logit": list(rng.random(20))}}
    url = Path(synthetic_run(str(tmp_path / "out"), rows, normalize_against="train"))
    m = json.loads((url / "manifest.json").read_text())
    assert m["rows_without_reference"] == {"test": {"3": 5}}
    scores = pq.read_table(url / "scores").to_pandas()
    assert scores["rank"].isna().sum() == 5 and scores["z_late_logit"].isna().sum() == 5
    v = _verify(url, source=False)
    assert v.ok, v.problems
    f = next(p for p in sorted((url / "scores").glob("*.parquet")) if "te-03" in pq.read_table(p)["id"].to_pylist())

    def rank_it(t):
        i = t["id"].to_pylist().index("te-03")
        return _set(t, "rank", i, 1)

    _edit(f, rank_it)
    v = _verify(url, source=False)
    assert not v.ok and any(p.startswith("unreferenced:") and "te-03" in p for p in v.problems), v.problems


@pytest.mark.integration
def test_the_gates_ray_tasks_find_what_the_threads_find(run, shared_ray):
    """The publishing gate's mapper (``distributed.validate.ray_map``: runs of files as 1-CPU Ray
    tasks) gives the verdict of ``vog-ray verify``'s threads, on the consistent run and damaged."""
    from vog_ray.distributed.validate import ray_map

    for damage in (None, "rank order", "carried columns"):
        if damage:
            DAMAGE[damage](run)
        here, tasks = _verify(run), _verify(run, mapper=ray_map)
        assert (tasks.ok, tasks.problems, tasks.rows, tasks.checked) == (here.ok, here.problems, here.rows,
                                                                         here.checked), damage
        assert tasks.ok == (damage is None)
