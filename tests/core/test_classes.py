"""Class moments from exact per-block sums (``core.classes``): the class table equals an exact
rational reference (Python ``Fraction`` sums of the float64 values, correctly rounded once) bit
for bit, whatever the blocking; and the (split, class) group codes every per-row step uses."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pyarrow as pa
import pytest

from vog_ray.core.classes import exact_class_means, exact_class_sums, exact_class_table, group_codes

KEYS = ["all_logit", "late_softmax"]


def _table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 5, n)
    # values over many binary orders of magnitude (exponents from 2**-60 to 2**40), and repeats
    v1 = rng.gamma(2.0, 1.0, n) * 2.0 ** rng.integers(-60, 40, n)
    v2 = np.round(rng.random(n), 2)
    return pa.table({"split": rng.choice(["train", "test", "ood"], n), "target_label": label,
                     "correct": pa.array(np.where(rng.random(n) < 0.1, None, rng.random(n) < 0.8).tolist(), pa.bool_()),
                     "vog_all_logit": v1, "vog_late_softmax": v2})


def _class_table(blocks: list[pa.Table]) -> pa.Table:
    first = [r for b in blocks for r in exact_class_sums(b, KEYS).to_pylist()]
    means = exact_class_means(first, KEYS)
    second = [r for b in blocks for r in exact_class_sums(b, KEYS, means).to_pylist()]
    return exact_class_table(first, second, KEYS)


def _reference(t: pa.Table) -> dict[tuple[str, int], dict[str, float]]:
    d = t.to_pydict()
    out: dict[tuple[str, int], dict[str, float]] = {}
    for s, c in sorted(set(zip(d["split"], d["target_label"]))):
        rows = [i for i in range(t.num_rows) if d["split"][i] == s and d["target_label"][i] == c]
        rec = {"count": len(rows)}
        for k in KEYS:
            v = [d[f"vog_{k}"][i] for i in rows]
            mean = float(sum(Fraction(x) for x in v) / len(v))                  # correctly rounded
            dev = [float(np.float64(x) - np.float64(mean)) ** 2 for x in v]     # float64, as the reduce squares
            rec[f"mean_{k}"] = mean
            rec[f"std_{k}"] = float(np.sqrt(float(sum(Fraction(x) for x in dev) / len(v))))
        out[(s, int(c))] = rec
    return out


@pytest.mark.parametrize("cuts", [[2000], [1, 999, 1000], [700, 0, 13, 1287]])
def test_exact_class_table_equals_the_rational_reference_for_any_blocking(cuts):
    t = _table(2000, seed=len(cuts))
    blocks, at = [], 0
    for c in cuts:
        blocks.append(t.slice(at, c))
        at += c
    got = _class_table(blocks).to_pylist()
    ref = _reference(t)
    assert [(r["split"], r["class"]) for r in got] == list(ref)
    for r in got:
        want = ref[(r["split"], r["class"])]
        assert r["count"] == want["count"]
        for k in KEYS:  # bit for bit
            assert r[f"mean_{k}"] == want[f"mean_{k}"] and r[f"std_{k}"] == want[f"std_{k}"], (r, want)
    assert _class_table([t]).equals(_class_table(blocks))


def test_group_codes_order_groups_by_split_then_class():
    t = pa.table({"split": ["b", "a", "b", "a", "b"], "target_label": pa.array([3, 7, None, 7, 3], pa.int64())})
    codes, g_split, g_class, sidx, names = group_codes(t)
    assert names == ["a", "b"] and sidx.tolist() == [1, 0, 1, 0, 1]
    assert list(zip(g_split, g_class.tolist())) == [("a", 7), ("b", -1), ("b", 3)]   # null class → -1
    assert codes.tolist() == [2, 0, 1, 0, 2]
    big = pa.table({"split": ["a", "a"], "target_label": [0, 10_000_000]})   # too wide a grid: sorted keys
    assert group_codes(big)[0].tolist() == [0, 1]
