"""Flags (core.flags, config ``flags``): which ranked rows a rule flags, against a plain-Python
reference; precision and recall by hand; the config's per-split rules and its errors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vog_ray.config import ConfigError, validate
from vog_ray.core.flags import FlagRule, flag_block, flagged_rows, precision_recall


def _ranked(n_a: int, n_b: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("a", n_a), ("b", n_b)):
        score = np.sort(rng.normal(size=n))[::-1]
        for r in range(n):
            label = int(rng.integers(-1, 3))
            rows.append({"split": split, "rank": r + 1, "score": float(score[r]), "label": label,
                         "pred": int(rng.integers(0, 3))})
    return pa.Table.from_pylist(rows)


def _reference(rows: list[dict], rules: dict[str, dict], sizes: dict[str, int]) -> list[bool]:
    """One row at a time, as the config reads."""
    out = []
    for r in rows:
        rule = rules.get(r["split"])
        if rule is None or all(rule.get(k) in (None, False) for k in ("top_percent", "z_above", "label_mismatch")):
            out.append(False)
            continue
        ok = True
        if rule.get("top_percent") is not None:
            ok &= r["rank"] <= int(sizes[r["split"]] * rule["top_percent"] / 100 + 1e-9)
        if rule.get("z_above") is not None:
            ok &= r["score"] > rule["z_above"]
        if rule.get("label_mismatch"):
            ok &= r["label"] >= 0 and r["label"] != r["pred"]
        out.append(bool(ok))
    return out


@pytest.mark.parametrize("rules", [
    {"a": {"top_percent": 5}, "b": {"top_percent": 12.5}},
    {"a": {"z_above": 1.0}, "b": {"z_above": -0.5, "label_mismatch": True}},
    {"a": {"top_percent": 30, "z_above": 0.2, "label_mismatch": True}},
    {"a": {"label_mismatch": True}, "b": {}},
])
def test_flag_block_matches_the_reference(rules):
    t = _ranked(400, 160)
    sizes = {"a": 400, "b": 160}
    got = flag_block(t, rules, sizes).column("flagged").to_pylist()
    assert got == _reference(t.to_pylist(), rules, sizes)
    only = flagged_rows(t, rules, sizes)
    assert only.num_rows == sum(got) and all(only.column("flagged").to_pylist())


def test_top_percent_counts():
    t = _ranked(1000, 7)
    got = flag_block(t, {"a": FlagRule(top_percent=5), "b": FlagRule(top_percent=50)}, {"a": 1000, "b": 7})
    split = np.array(got.column("split").to_pylist())
    flagged = np.array(got.column("flagged").to_pylist())
    assert flagged[split == "a"].sum() == 50            # 5% of 1000
    assert flagged[split == "b"].sum() == 3             # 50% of 7: ranks 1..3 (rank * 100 <= 350)


def test_precision_recall_by_hand():
    flagged = [True, True, True, False, False, False, True]
    truth = [True, False, True, True, None, False, float("nan")]
    pr = precision_recall(np.array(flagged), np.array(truth, dtype=object))
    # known rows: 0..3 and 5 → flagged 0,1,2 ; truth 0,2,3 → TP 0,2
    assert pr["n"] == 5 and pr["n_flagged"] == 3 and pr["n_true"] == 3 and pr["true_positives"] == 2
    assert pr["precision"] == pytest.approx(2 / 3) and pr["recall"] == pytest.approx(2 / 3)
    assert pr["base_rate"] == pytest.approx(3 / 5)
    none = precision_recall(np.zeros(3, bool), np.array([False, False, False], dtype=object))
    assert none["precision"] is None and none["recall"] is None


def _cfg(flags: dict) -> dict:
    split = {"format": "npz", "url": "x.npz", "keep_columns": ["is_noisy"]}
    return {"data": {"splits": {"train": split, "test": {"format": "npz", "url": "y.npz"}}}, "model": "lenet",
            "checkpoints": "c", "output": {"url": "o"}, "flags": flags}


def test_config_rules_per_split():
    cfg = validate(_cfg({"top_percent": 10, "ground_truth": "is_noisy",
                         "splits": {"test": {"z_above": 2.0, "top_percent": None}}}))
    rules = cfg.flags.rules(["train", "test"])
    assert rules["train"] == {"top_percent": 10, "z_above": None, "label_mismatch": False}
    assert rules["test"] == {"top_percent": None, "z_above": 2.0, "label_mismatch": False}
    assert validate(_cfg({})).flags.rules(["train"])["train"] == {"top_percent": None, "z_above": None,
                                                                   "label_mismatch": False}


@pytest.mark.parametrize("flags, needle", [
    ({"splits": {"val": {"top_percent": 5}}}, "flags.splits.val"),
    ({"ground_truth": "nope"}, "flags.ground_truth"),
    ({"top_percent": 0}, "flags.top_percent"),
    ({"top_percent": 101}, "flags.top_percent"),
    ({"top_pct": 5}, "flags.top_pct: unknown key"),
])
def test_config_errors_name_the_key(flags, needle):
    with pytest.raises(ConfigError) as ei:
        validate(_cfg(flags), "audit.yaml")
    assert needle in str(ei.value) and "audit.yaml" in str(ei.value), str(ei.value)
