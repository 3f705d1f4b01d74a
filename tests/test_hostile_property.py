"""The property of issue #12, on random small splits: every audit either publishes a run that
passes the run validator AND holds exactly the table an independent oracle expects (the rows, the
rejected ones, the carried values and types, ranks 1..n), or fails with exactly one ``error:``
line, publishing nothing — exit 2 for input that can never be scored as configured (reserved column
names, columns missing or of disagreeing types, string labels: refused while planning; fractional
labels: found by the reader, in a Ray task), exit 1 for the other failures that only reading the
rows reveals (null or duplicate ids, nothing scorable). Never a traceback, never a wrong
table.

Hypothesis draws the files of a Parquet split (1–6 rows each), the ids (derived, or an id column
of arbitrary text, nulls and repeats included), labels (valid, out of range, missing, fractional,
strings, the column absent), images (good, corrupt, null) and carried columns of several types
(nulls anywhere, int64 beyond 2**53, a type that flips between files, names the audit reserves).
One local Ray serves every example.
"""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MAX_EXAMPLES = 12  # each scored example is a whole audit (~10-30 s on 2 busy cores); refusals are instant
TYPES = {"k_int": pa.int64(), "k_str": pa.string(), "k_bool": pa.bool_(), "k_list": pa.list_(pa.int64()),
         "k_float": pa.float64()}
RESERVED = ("pred", "rank")  # carried names the audit writes itself: refused
FLIP = {pa.int64(): pa.float64(), pa.string(): pa.int64(), pa.bool_(): pa.int64(),
        pa.list_(pa.int64()): pa.string(), pa.float64(): pa.string()}


def _values(typ: pa.DataType) -> st.SearchStrategy:
    base = {
        pa.int64(): st.integers(-(2 ** 63), 2 ** 63 - 1) | st.integers(2 ** 53, 2 ** 53 + 9),
        pa.string(): st.text(max_size=6),
        pa.bool_(): st.booleans(),
        pa.list_(pa.int64()): st.lists(st.integers(-(2 ** 63), 2 ** 63 - 1), max_size=3),
        pa.float64(): st.floats(allow_nan=True, allow_infinity=True),
    }[typ]
    return st.none() | base


@st.composite
def split_files(draw) -> dict[str, Any]:
    """Files of one split: rows, plus what the oracle needs to know about them. Most draws are
    audits that publish; the rest exercise each way to be refused or to fail."""
    id_column = draw(st.booleans())
    label_kind = draw(st.sampled_from(["int"] * 10 + ["float", "string", "absent"]))
    keep = draw(st.lists(st.sampled_from(list(TYPES) * 3 + list(RESERVED)), max_size=3, unique=True))
    flip = draw(st.sampled_from([None] * 8 + [k for k in keep if k in TYPES]))
    sizes = draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))
    ids = draw(st.lists(st.text(min_size=1, max_size=6), min_size=sum(sizes), max_size=sum(sizes), unique=True))
    id_problem = draw(st.sampled_from([None] * 8 + ["null", "repeat"])) if id_column else None
    if id_problem == "null":
        ids[draw(st.integers(0, len(ids) - 1))] = None
    elif id_problem == "repeat" and len(ids) > 1:
        ids[-1] = ids[0]
    good_label = st.integers(0, 9)
    label_st = st.one_of(good_label, good_label, good_label, st.sampled_from([None, -1, -5, 10, 12]))
    image_st = st.sampled_from(["good"] * 8 + ["corrupt", "null"])
    files, at = [], 0
    for f, n in enumerate(sizes):
        rows = []
        for _ in range(n):
            label = draw(label_st)
            if label_kind == "float" and label is not None and draw(st.integers(0, 3)) == 0:
                label = label + 0.5
            rows.append({"image": draw(image_st), "label": label, "id": ids[at] if id_column else None,
                         "digit": draw(st.integers(0, 1796))})
            at += 1
        types = {k: (FLIP[TYPES[k]] if (k == flip and f == 1) else TYPES.get(k, pa.int64())) for k in keep}
        values = {k: [draw(_values(t)) for _ in range(n)] for k, t in types.items()}
        files.append({"rows": rows, "types": types, "values": values})
    return {"id_column": id_column, "label_kind": label_kind, "keep": keep, "files": files,
            "flipped": flip is not None and len(files) > 1}


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_split(d: Path, s: dict[str, Any], imgs: np.ndarray) -> None:
    d.mkdir(parents=True)
    for i, f in enumerate(s["files"]):
        rows = f["rows"]
        img = {"good": lambda r: _png(imgs[r["digit"]]), "corrupt": lambda r: b"\x89PNG junk", "null": lambda r: None}
        cols: dict[str, Any] = {"image": pa.array([img[r["image"]](r) for r in rows], pa.binary())}
        if s["label_kind"] != "absent":
            typ = {"int": pa.int64(), "float": pa.float64(), "string": pa.string()}[s["label_kind"]]
            cols["label"] = pa.array([None if r["label"] is None else
                                      (str(r["label"]) if s["label_kind"] == "string" else r["label"]) for r in rows], typ)
        if s["id_column"]:
            cols["key"] = pa.array([r["id"] for r in rows], pa.string())
        for k, t in f["types"].items():
            vals = f["values"][k]
            if t == pa.string() and TYPES.get(k) != pa.string():  # a flipped column: the values as text
                vals = [None if v is None else str(v) for v in vals]
            elif t == pa.float64() and TYPES.get(k) == pa.int64():
                vals = [None if v is None else float(v) for v in vals]
            elif t == pa.int64() and TYPES.get(k) not in (None, pa.int64()):
                vals = [None if v is None else i for i, v in enumerate(vals)]
            cols[k] = pa.array(vals, t)
        pq.write_table(pa.table(cols), d / f"part-{i}.parquet")


def expected(s: dict[str, Any]) -> tuple[int, set[str] | None, dict[str, str]]:
    """The oracle: ``(exit code, message fragments …)`` for a refusal or failure, else ``(0, …)``
    with the rejected ids and their reason prefixes."""
    if any(k in RESERVED for k in s["keep"]) or s["label_kind"] in ("string", "absent") or s["flipped"]:
        return 2, None, {}
    rows = [(f"part-{i}.parquet", j, r) for i, f in enumerate(s["files"]) for j, r in enumerate(f["rows"])]
    if s["label_kind"] == "float" and any(isinstance(r["label"], float) for _, _, r in rows):
        return 2, None, {}
    ids = [r["id"] if s["id_column"] else f"{name}:{j}" for name, j, r in rows]
    if s["id_column"] and (None in ids or len(set(ids)) < len(ids)):
        return 1, None, {}
    reasons = {}
    for i, (_, _, r) in zip(ids, rows):
        if r["image"] != "good":
            reasons[i] = "missing_image" if r["image"] == "null" else "decode_error"
        elif r["label"] is None or r["label"] == -1:
            reasons[i] = "missing_label"
        elif not 0 <= r["label"] < 10:
            reasons[i] = "label_out_of_range"
    if len(reasons) == len(ids):  # nothing scorable (or nothing to decode at all)
        return 1, None, {}
    return 0, set(reasons), reasons


@pytest.fixture(scope="module")
def env(tiny_digits, shared_ray, tmp_path_factory):
    state = {"tiny": tiny_digits, "root": tmp_path_factory.mktemp("property"), "n": [0], "times": []}
    yield state
    times = state["times"]  # what the examples cost (shown with -s)
    print(f"\nproperty examples: {len(times)}, seconds {sum(t for _, t in times):.0f}: {times}")


def _run_cli(path: Path) -> tuple[int, str]:
    from vog_ray.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["audit", str(path), "--no-report"])
    return code, err.getvalue()


def _check_published(out: Path, s: dict[str, Any], rejected: set[str], reasons: dict[str, str]) -> None:
    from vog_ray.runs import open_run
    from vog_ray.verify import verify_run

    run = open_run(str(out))
    v = verify_run(run.url)
    assert v.ok, v.problems
    scores, rej = run.scores(), run.rejected()
    got_rej = dict(zip(rej["id"].to_pylist(), rej["reason"].to_pylist()))
    assert set(got_rej) == rejected
    assert all(got_rej[i].startswith(reasons[i]) for i in rejected), (got_rej, reasons)
    n = sum(len(f["rows"]) for f in s["files"])
    assert scores.num_rows == n - len(rejected)
    assert sorted(scores["rank"].to_pylist()) == list(range(1, scores.num_rows + 1))
    for k in s["keep"]:  # every carried value and type, as in the source
        want = {}
        for i, f in enumerate(s["files"]):
            for j, (r, val) in enumerate(zip(f["rows"], f["values"][k])):
                want[r["id"] if s["id_column"] else f"part-{i}.parquet:{j}"] = val
        for t in (scores, rej):
            assert t.schema.field(k).type == TYPES[k], (k, t.schema.field(k).type)
            for i, val in zip(t["id"].to_pylist(), t[k].to_pylist()):
                assert val == want[i] or (val != val and want[i] != want[i]), (k, i, val, want[i])


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(s=split_files())
def test_every_audit_publishes_a_valid_run_or_fails_with_one_error_line(env, s):
    env["n"][0] += 1
    root = env["root"] / f"ex-{env['n'][0]}"
    write_split(root / "train", s, env["tiny"].imgs)
    spec = {"format": "parquet", "url": str(root / "train"), "keep_columns": s["keep"]}
    if s["id_column"]:
        spec["id_column"] = "key"
    cfg = env["tiny"].config({"train": spec}, str(root / "out"))
    cfg["compute"] = {**cfg["compute"], "batch_size": 64, "decode_batch_size": 64}
    path = root / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    want, rejected, reasons = expected(s)
    t = time.perf_counter()
    code, err = _run_cli(path)
    env["times"].append((code, round(time.perf_counter() - t, 1)))
    assert "Traceback" not in err, err
    assert code == want, (want, err[-2000:])
    if code:
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
        from vog_ray.runs import list_runs

        assert not (root / "out").exists() or list_runs(str(root / "out")) == []
        return
    _check_published(root / "out", s, rejected, reasons)

