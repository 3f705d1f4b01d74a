"""The hostile-input matrix of issue #12: no silent wrong result. Every case of the issue's list
either is refused up front — exit 2 before any Ray work, one ``error:`` line naming the file and
the key, nothing written — or publishes a run that passes the run validator.

Refused up front (the CLI, in this process; no Ray starts):

1. keep columns named like a column the audit writes (``pred``, ``correct``, ``vog_all_logit``,
   ``split``, ``status``, ``rank``, ``score``);
2. a NaN weight / a +inf bias in one checkpoint (names the file and the tensor);
3. a window of one checkpoint (``[0, 0, 0]``) or of none (``"0:0"``);
6. string labels, and files of one split that disagree on a column's type (bool vs int64);
7. the output inside an input URL, and an input inside the output;
8. an image-folder symlink whose target leaves the split's root;
9. a truncated, an empty and a pickled-module checkpoint (names the file; never suggests
   loading it unsafely);
10. report settings the run cannot have (an OoD split that is not a split, a flag column that
    is not carried) and an unknown ``rank_by``;
11. ``vog-ray runs`` on a missing place (exit 1) and on a place without runs (exit 0, says so).

Audited on a local Ray (each publishes a run that passes its invariants):

2. a model whose gradient is NaN for some examples: those rows are rejected
   (``non_finite_vog: …``), never a z of 0 — and (10) when the report fails after the run was
   published, the error line says the run was published and names it;
4. carried columns keep their Arrow type and every value (nullable int64 above 2**53 with nulls
   anywhere — also only in the last rows —, bool, string, list, timestamp, decimal), in the score
   table and in ``rejected.parquet``;
5. two audits of one config at once: the second fails at once naming the lock; a rerun works;
6. a fractional label: one ``error:`` line naming the file and the column, exit 2 (found by the
   reader in a Ray task: input that can never be scored, like string labels);
8. symlinked files inside an image folder's root (a class of links only, one link among files)
   are read and counted alike.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.rayenv import start_test_ray

# own_ray: its audits run on a Ray whose workers get the repository on PYTHONPATH (runs after the
# modules on the shared Ray)
pytestmark = pytest.mark.own_ray

REPO = Path(__file__).resolve().parents[1]
N = 60  # rows of the train split (two files)
BIG = 2 ** 53 + 1


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _carried(n: int) -> dict[str, pa.Array]:
    """Carried columns of every kind, nulls anywhere (``late_null``: only in the last rows)."""
    return {
        "big": pa.array([None if i % 10 == 0 else BIG + 2 * i for i in range(n)], pa.int64()),
        "late_null": pa.array([BIG + i if i < n - 5 else None for i in range(n)], pa.int64()),
        "flag": pa.array([None if i % 9 == 4 else i % 2 == 0 for i in range(n)], pa.bool_()),
        "tag": pa.array([None if i % 6 == 1 else f"t-{i}" for i in range(n)], pa.string()),
        "lst": pa.array([None if i % 8 == 2 else [i, -i, BIG] for i in range(n)], pa.list_(pa.int64())),
        "ts": pa.array([None if i % 7 == 0 else 1_700_000_000_000_000 + i for i in range(n)], pa.timestamp("us")),
        "dec": pa.array([None if i % 5 == 3 else Decimal(f"{i}.25") for i in range(n)], pa.decimal128(10, 2)),
    }


CARRIED = ("big", "late_null", "flag", "tag", "lst", "ts", "dec")
WRITTEN = ("pred", "correct", "vog_all_logit", "split", "status", "rank", "score")


@pytest.fixture(scope="module")
def data(tiny_digits, tmp_path_factory):
    """``train``: two Parquet files of digits with every kind of carried column and columns named
    like the audit's own, two undecodable rows; configs written as YAML by ``cfg``."""
    root = tmp_path_factory.mktemp("hostile")
    imgs, labels = tiny_digits.imgs, tiny_digits.labels
    images = [_png(imgs[i]) for i in range(N)]
    images[7], images[N - 3] = b"not a png", b"\x89PNG broken"  # rejected rows carry their values too
    cols = {"key": [f"row-{i:03d}" for i in range(N)], "image": pa.array(images, pa.binary()),
            "label": pa.array(labels[:N], pa.int64()), **_carried(N)}
    for w in WRITTEN:
        cols[w] = pa.array(["other"] * N if w in ("split", "status") else np.arange(N, dtype=np.float64))
    table = pa.table(cols)
    (root / "train").mkdir()
    pq.write_table(table.slice(0, N // 2), root / "train" / "part-0.parquet", row_group_size=16)
    pq.write_table(table.slice(N // 2), root / "train" / "part-1.parquet", row_group_size=16)

    def cfg(name: str, **sections) -> Path:
        splits = sections.pop("splits", {"train": {"format": "parquet", "url": str(root / "train"), "id_column": "key"}})
        model, compute = sections.pop("model", None), sections.pop("compute", {})
        c = tiny_digits.config(splits, str(root / "out" / name), **sections)
        c["model"] = model or c["model"]
        c["compute"] = {**c["compute"], "batch_size": 64, "decode_batch_size": 64, **compute}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(c))
        return path

    return {"root": root, "tiny": tiny_digits, "cfg": cfg, "table": table}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from vog_ray.cli import main

    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error_line(err: str) -> str:
    """The ``error:`` line of a failure (exactly one, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return err[err.index("error:"):]


# ---------------------------------------------------------------------------------------------
# refused up front: exit 2, one error line naming file and key, nothing written


def _refused(capsys, path: Path, *expected: str) -> str:
    code, _, err = _cli(capsys, "audit", str(path))
    msg = _one_error_line(err)
    assert code == 2, err
    for e in expected:
        assert e in msg, (e, msg)
    out = yaml.safe_load(path.read_text())["output"]["url"]
    assert not Path(out).exists(), f"a refused audit wrote {out}"
    return msg


@pytest.mark.parametrize("column", WRITTEN)
def test_1_keep_columns_that_clash_with_the_audits_are_refused(data, capsys, column):
    path = data["cfg"](f"clash-{column}", splits={"train": {"format": "parquet", "url": str(data["root"] / "train"),
                                                           "id_column": "key", "keep_columns": [column]}})
    _refused(capsys, path, str(path), "data.splits.train.keep_columns", f"{column!r} is a column the audit writes")


def _checkpoints(tiny, root: Path, name: str, edit) -> str:
    """A copy of the tiny checkpoints with ``edit(state_dict)`` applied to the second one."""
    import torch

    d = root / name
    d.mkdir()
    for p in sorted(Path(tiny.ckpt_dir).glob("epoch_*.pt")):
        shutil.copy(p, d / p.name)
    target = sorted(d.glob("epoch_*.pt"))[1]
    sd = torch.load(target, weights_only=True)
    edit(sd, target)
    return str(d / "epoch_*.pt")


def _nan_weight(sd, path):
    import torch

    k = next(k for k, v in sd.items() if v.dim() > 1)
    sd[k].view(-1)[3] = float("nan")
    torch.save(sd, path)


def _inf_bias(sd, path):
    import torch

    k = next(k for k in sd if k.endswith("bias"))
    sd[k][0] = float("inf")
    torch.save(sd, path)


@pytest.mark.parametrize("edit, kind", [(_nan_weight, "NaN"), (_inf_bias, "+inf")])
def test_2_a_non_finite_checkpoint_is_refused_naming_file_and_tensor(data, capsys, edit, kind):
    glob = _checkpoints(data["tiny"], data["root"], f"ckpt-{kind}", edit)
    msg = _refused(capsys, data["cfg"](f"ckpt-{kind}", checkpoints=glob), "epoch_2.pt", "tensor '",
                   f"non-finite value(s) ({kind})")
    assert "weights_only" not in msg


@pytest.mark.parametrize("name, window, text", [("dup", [0, 0, 0], "covers 1 checkpoint"),
                                                ("empty", "0:0", "selects no checkpoint")])
def test_3_a_window_of_fewer_than_two_checkpoints_is_refused(data, capsys, name, window, text):
    path = data["cfg"](f"window-{name}", vog={"windows": {"a": window}})
    _refused(capsys, path, str(path), "vog.windows: window 'a'", text)


def _split_dir(root: Path, name: str, tables: list[pa.Table]) -> str:
    d = root / name
    d.mkdir()
    for i, t in enumerate(tables):
        pq.write_table(t, d / f"part-{i}.parquet")
    return str(d)


def test_6_string_labels_are_refused_from_the_footers(data, capsys):
    t = data["table"].select(["image", "label"])
    url = _split_dir(data["root"], "string-labels", [t.set_column(1, "label", t["label"].cast(pa.string()))])
    path = data["cfg"]("string-labels", splits={"train": {"format": "parquet", "url": url}})
    _refused(capsys, path, str(path), "data.splits.train.label_column", "'label' is string in part-0.parquet",
             "labels must be integers")


def test_6_files_that_disagree_on_a_columns_type_are_refused_before_scoring(data, capsys):
    t = data["table"].select(["image", "label", "flag"])
    a = t.slice(0, 30)
    b = t.slice(30).set_column(2, "flag", pa.array(np.arange(30) % 2, pa.int64()))
    url = _split_dir(data["root"], "bool-vs-int", [a, b])
    path = data["cfg"]("bool-vs-int", splits={"train": {"format": "parquet", "url": url, "keep_columns": ["flag"]}})
    _refused(capsys, path, str(path), "data.splits.train.keep_columns",
             "'flag' is bool in part-0.parquet but int64 in part-1.parquet")


def test_7_output_inside_an_input_and_input_inside_the_output_are_refused(data, capsys):
    root = data["root"]
    path = data["cfg"]("inside")
    c = yaml.safe_load(path.read_text())
    c["output"]["url"] = str(root / "train" / "vog")
    path.write_text(yaml.safe_dump(c))
    _refused(capsys, path, str(path), "output.url", "lies inside the input of split 'train'")
    c["output"]["url"] = str(root)
    path.write_text(yaml.safe_dump(c))
    code, _, err = _cli(capsys, "audit", str(path))
    assert code == 2 and "holds the input of split 'train'" in _one_error_line(err), err


def _folder(root: Path, name: str, tiny, n: int = 6) -> Path:
    from PIL import Image

    d = root / name
    for c in ("a", "b"):
        (d / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(tiny.imgs[i + (0 if c == "a" else 50)]).save(d / c / f"{i}.png")
    return d


def test_8_a_symlink_leaving_the_image_folder_is_refused(data, capsys):
    root = data["root"]
    d = _folder(root, "folder-escape", data["tiny"])
    outside = root / "outside.png"
    shutil.copy(d / "a" / "0.png", outside)
    os.symlink(outside, d / "b" / "escape.png")
    path = data["cfg"]("folder-escape", splits={"imgs": {"format": "image_folder", "url": str(d)}})
    _refused(capsys, path, str(path), "data.splits.imgs.url", "'b/escape.png' is a symlink to",
             "outside the split's root")


def _bad_checkpoint(kind: str):
    def edit(sd, path):
        import torch

        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif kind == "empty":
            path.write_bytes(b"")
        else:  # a whole pickled module instead of its state_dict
            torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    return edit


@pytest.mark.parametrize("kind, text", [("truncated", "is truncated or corrupt"), ("empty", "is empty (0 bytes)"),
                                        ("module", "holds a pickled object (torch.nn.modules.container.Sequential)")])
def test_9_checkpoint_errors_name_the_file_and_never_suggest_unsafe_loading(data, capsys, kind, text):
    glob = _checkpoints(data["tiny"], data["root"], f"ckpt-{kind}", _bad_checkpoint(kind))
    msg = _refused(capsys, data["cfg"](f"ckpt-{kind}", checkpoints=glob), "epoch_2.pt", text)
    assert "False" not in msg and "add_safe_globals" not in msg, msg


@pytest.mark.parametrize("name, section, value, text", [
    ("ood", "report", {"ood": {"in_distribution": "test", "ood_splits": ["train"]}},
     "report.ood.in_distribution: 'test' is not a split"),
    ("flag", "report", {"flag_columns": ["is_noisy"]}, "report.flag_columns: 'is_noisy' is not carried by any split"),
    ("rank-by", "vog", {"rank_by": "late_softmax"}, "vog.rank_by: 'late_softmax' is not one of"),
])
def test_10_report_settings_and_rank_by_the_run_cannot_have_are_refused(data, capsys, name, section, value, text):
    path = data["cfg"](f"settings-{name}", **{section: value})
    _refused(capsys, path, str(path), text)


def test_11_runs_on_a_missing_or_empty_place(data, capsys):
    missing = data["root"] / "no-such-output"
    code, out, err = _cli(capsys, "runs", str(missing))
    assert code == 1 and out == "" and f"no output at {str(missing)!r}" in _one_error_line(err)
    empty = data["root"] / "empty-output"
    empty.mkdir()
    code, out, err = _cli(capsys, "runs", str(empty))
    assert code == 0 and out == "" and f"no published run under {str(empty)!r}" in err


# ---------------------------------------------------------------------------------------------
# audited on a local Ray: the published run passes its invariants


@pytest.fixture(scope="module")
def ray_env(data):
    import ray

    env = start_test_ray({"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    yield env
    ray.shutdown()


def _audit(path: Path):
    from vog_ray.config import load_config
    from vog_ray.distributed.audit import run_audit

    return run_audit(load_config(path))


@pytest.mark.integration
@pytest.mark.slow
def test_4_carried_columns_keep_their_type_and_every_value(data, ray_env):
    from vog_ray.runs import open_run

    keep = list(CARRIED)
    path = data["cfg"]("carried", splits={"train": {"format": "parquet", "url": str(data["root"] / "train"),
                                                    "id_column": "key", "keep_columns": keep}})
    run = open_run(_audit(path).run_url)
    src = data["table"]
    want = {k: dict(zip(src["key"].to_pylist(), src[k].to_pylist())) for k in keep}
    scores, rejected = run.scores(), run.rejected()
    assert rejected.num_rows == 2 and scores.num_rows == N - 2
    for t in (scores, rejected):
        for k in keep:
            assert t.schema.field(k).type == src.schema.field(k).type, (k, t.schema.field(k).type)
            got = dict(zip(t["id"].to_pylist(), t[k].to_pylist()))
            assert all(got[i] == want[k][i] for i in got), k
    assert sorted(rejected["id"].to_pylist()) == ["row-007", f"row-{N - 3:03d}"]


@pytest.mark.integration
@pytest.mark.slow
def test_2_rows_whose_vog_is_not_finite_are_rejected_never_a_z_of_0(data, ray_env, capsys, monkeypatch):
    """…and (case 10) a report that fails after the run was published says the run stands."""
    import torch

    import vog_ray.report
    from tests.helpers_factory import sqrt_pixel
    from vog_ray.report.common import ReportError
    from vog_ray.runs import open_run

    d = data["root"] / "sqrt-ckpts"
    d.mkdir()
    for i in range(3):
        torch.manual_seed(i)
        torch.save(sqrt_pixel().state_dict(), d / f"epoch_{i + 1}.pt")
    path = data["cfg"]("nan-vog", model={"name": "tests.helpers_factory:sqrt_pixel"}, checkpoints=str(d / "epoch_*.pt"),
                       report={"enabled": True})

    def no_report(*a, **k):
        raise ReportError("the report broke")

    monkeypatch.setattr(vog_ray.report, "build_report", no_report)
    code, out, err = _cli(capsys, "audit", str(path))
    msg = _one_error_line(err)
    run = open_run(str(data["root"] / "out" / "nan-vog"))
    assert code == 1 and f"run {run.run_id} was published at {run.url}, but its report failed: the report broke" in msg
    zero = {f"row-{i:03d}" for i in range(N) if data["tiny"].imgs[i].reshape(-1)[25] == 0} - {"row-007", f"row-{N - 3:03d}"}
    rej = run.rejected()
    nan_rows = {i for i, r in zip(rej["id"].to_pylist(), rej["reason"].to_pylist()) if r == "non_finite_vog: all_logit"}
    assert nan_rows == zero and 0 < len(zero) < N
    s = run.scores()
    assert s.num_rows == N - 2 - len(zero)
    for c in ("vog_all_logit", "z_all_logit", "score"):
        assert np.isfinite(s[c].to_numpy()).all(), c
    # a z of 0 only where the class's std is 0 (a class of one scored example), never for a NaN
    degenerate = {c for c, d in zip(run.classes()["class"].to_pylist(), run.classes()["degenerate_all_logit"].to_pylist())
                  if d}
    zero_z = [c for c, z in zip(s["target_label"].to_pylist(), s["z_all_logit"].to_pylist()) if z == 0.0]
    assert set(zero_z) <= degenerate


@pytest.mark.integration
@pytest.mark.slow
def test_8_symlinks_inside_the_image_folder_are_read_and_counted_alike(data, ray_env):
    from vog_ray.runs import open_run

    root = data["root"]
    d = _folder(root, "folder-links", data["tiny"])
    store = d / ".store"  # hidden: not a class folder, but inside the root
    store.mkdir()
    for f in sorted((d / "a").glob("*.png")):  # class a: links only
        shutil.move(f, store / f.name)
        os.symlink(store / f.name, f)
    shutil.copy(d / "b" / "0.png", store / "extra.png")
    os.symlink(store / "extra.png", d / "b" / "link.png")  # class b: one link among files
    path = data["cfg"]("folder-links", splits={"imgs": {"format": "image_folder", "url": str(d),
                                                        "keep_columns": ["class_name", "path"]}})
    res = _audit(path)
    assert res.manifest["splits"]["imgs"] == {"rows_in": 13, "rows_scored": 13, "rows_rejected": 0}
    ids = sorted(open_run(res.run_url).scores()["id"].to_pylist())
    assert ids == sorted([f"a/{i}.png" for i in range(6)] + [f"b/{i}.png" for i in range(6)] + ["b/link.png"])


@pytest.mark.integration
@pytest.mark.slow
def test_6_a_fractional_label_is_one_error_line_naming_file_and_column(data, ray_env, capsys):
    t = data["table"].select(["image", "label"])
    labels = t["label"].cast(pa.float64()).to_pylist()
    labels[40] = 2.5
    url = _split_dir(data["root"], "fractional", [t.set_column(1, "label", pa.array(labels, pa.float64()))])
    path = data["cfg"]("fractional", splits={"train": {"format": "parquet", "url": url}})
    code, _, err = _cli(capsys, "audit", str(path), "--no-report")
    msg = _one_error_line(err)
    assert code == 2 and "part-0.parquet" in msg and "label column 'label' holds non-integer values" in msg, msg
    from vog_ray.runs import list_runs

    assert list_runs(str(data["root"] / "out" / "fractional")) == []


SLOW_FORWARD_S = 1.5  # 4 batches × 3 checkpoints: the first audit holds the lock for about 20 s


def _lock_files(out: Path) -> list[Path]:
    return list((out / "_work").glob("*/lock")) if (out / "_work").exists() else []


@pytest.mark.integration
@pytest.mark.slow
def test_5_two_audits_of_one_config_at_once_then_a_rerun(data):
    """The first holds the work directory's lock; the second, started while it does, fails at
    once saying so and touches nothing; the rerun afterwards publishes (reusing the first's work).
    The first scores with a forward that sleeps, so its stage 1 outlasts the second's planning."""
    slow = {**data["tiny"].MODEL, "name": "tests.faultproxy:slow_small_cnn", "delay": SLOW_FORWARD_S}
    path = data["cfg"]("twice", model=slow, compute={"batch_size": 16})
    cfg = yaml.safe_load(path.read_text())
    cfg["output"]["keep_work"] = True  # the rerun must find the finished work good (and reuse it)
    path.write_text(yaml.safe_dump(cfg))
    out = Path(cfg["output"]["url"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "disabled", "VOG_RAY_TORCH_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    cmd = [sys.executable, "-m", "vog_ray.cli", "audit", str(path), "--no-report"]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not _lock_files(out) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert _lock_files(out), "the first audit never took the work directory's lock"
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        o1, e1 = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    msg = _one_error_line(second.stderr)
    assert second.returncode == 1 and "another audit of the same config holds the lock" in msg, second.stderr[-2000:]
    assert first.returncode == 0, e1[-3000:]
    assert not _lock_files(out)
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    from vog_ray.runs import list_runs, open_run

    runs = list_runs(str(out))
    assert len(runs) == 2
    m = open_run(str(out)).manifest
    assert m["resumed_from_work"] is True and m["rows"] == {"in": N, "scored": N - 2, "rejected": 2}
