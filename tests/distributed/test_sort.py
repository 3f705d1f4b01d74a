"""The reduce's sample sort, step by step, against one ``sort_by`` of the whole table; and the
whole distributed sort with real Ray tasks, against the same naive reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from vog_ray.core.moments import PixelMoments
from vog_ray.core.ranking import SORT_KEYS, add_counts, assign_ranks, block_counts, rank_offsets, rank_table
from vog_ray.distributed.merge import MOMENT_PREFIXES as _MOMENT_PREFIXES
from vog_ray.distributed.merge import STATE_META as _STATE_META
from vog_ray.distributed.merge import fixed_size_list as _fsl
from vog_ray.distributed.merge import list_values as _list_values
from vog_ray.distributed.sort import choose_boundaries, merge_sorted, partition_block, sort_key_sample


def table(n: int, seed: int, ties: bool = False) -> pa.Table:
    rng = np.random.default_rng(seed)
    score = rng.normal(size=n)
    if ties:  # many equal scores: the id must break them, across blocks and partitions
        score = np.round(score, 1)
    return pa.table({"split": rng.choice(["test", "train", "ood"], n), "score": score,
                     "id": [f"x{j:05d}" for j in rng.permutation(n)], "target_label": rng.integers(0, 4, n),
                     "payload": rng.random(n)})


def blocks_of(t: pa.Table, sizes: list[int]) -> list[pa.Table]:
    out, at = [], 0
    for s in sizes:
        out.append(t.slice(at, s))
        at += s
    assert at == t.num_rows
    return out


@pytest.mark.parametrize("partitions", [1, 2, 5, 17])
@pytest.mark.parametrize("ties", [False, True])
def test_sample_sort_steps_equal_one_sort(partitions, ties):
    t = table(3000, seed=partitions, ties=ties)
    blocks = blocks_of(t, [0, 700, 1, 1299, 1000])  # an empty block and a one-row block
    samples = [sort_key_sample(b, SORT_KEYS, 16) for b in blocks]
    bounds = choose_boundaries(samples, SORT_KEYS, partitions)
    assert bounds.num_rows == partitions - 1
    cut = [partition_block(b, SORT_KEYS, bounds) for b in blocks]
    assert all(len(c) == partitions for c in cut)
    assert sum(p.num_rows for c in cut for p in c) == t.num_rows  # nothing lost, nothing doubled
    merged = [merge_sorted([c[p] for c in cut], SORT_KEYS) for p in range(partitions)]
    got = pa.concat_tables(merged)
    assert got.equals(t.sort_by(SORT_KEYS))
    # ranks from per-partition offsets == ranks of the whole table at once
    sizes, offsets = rank_offsets([block_counts(m) for m in merged])
    ranked = [assign_ranks(m, so, co, sizes) for m, (so, co) in zip(merged, offsets)]
    assert pa.concat_tables(ranked).equals(rank_table(t))
    # the same offsets from the cuts' counts, before any merge (what reduce.rank_dataset does)
    from vog_ray.distributed.reduce import merge_ranked

    assert rank_offsets([add_counts([block_counts(c[p]) for c in cut]) for p in range(partitions)]) == (sizes, offsets)
    ranked = [merge_ranked(SORT_KEYS, so, co, sizes, *[c[p] for c in cut]) for p, (so, co) in enumerate(offsets)]
    assert pa.concat_tables(ranked).equals(rank_table(t))


def test_partition_follows_arrow_order_for_nan_signed_zero_and_unicode():
    """Boundaries cut where Arrow's sort puts the rows: NaN after every number in both orders,
    -0.0 equal to 0.0 (the id decides), strings in UTF-8 byte (= code point) order."""
    rng = np.random.default_rng(5)
    n = 4000
    special = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, 1.0])
    score = np.where(rng.random(n) < 0.3, special[rng.integers(0, len(special), n)], rng.normal(size=n))
    ids = [f"{rng.choice(['a', 'Z', 'é', 'ø', '10', '9'])}{j}" for j in rng.permutation(n)]
    t = pa.table({"split": rng.choice(["b", "a", "ä"], n), "score": score, "id": ids,
                  "target_label": rng.integers(0, 3, n)})
    for keys in (SORT_KEYS, [("split", "ascending"), ("score", "ascending"), ("id", "descending")]):
        blocks = blocks_of(t, [1500, 1000, 1500])
        bounds = choose_boundaries([sort_key_sample(b, keys, 64) for b in blocks], keys, 9)
        cut = [partition_block(b, keys, bounds) for b in blocks]
        got = pa.concat_tables([merge_sorted([c[p] for c in cut], keys) for p in range(9)])
        want = t.sort_by(keys)
        assert got["id"].equals(want["id"]), keys


@pytest.mark.parametrize("partitions", [1, 3])
def test_rows_without_a_score_are_unranked_in_every_partition(partitions):
    """Rows with a NaN score (a class the reference split lacks) sort after every number of their
    split and get null ranks; the others are ranked 1..n among themselves, as a naive loop says."""
    t = table(1200, seed=11, ties=True)
    score = t["score"].to_numpy().copy()
    score[np.random.default_rng(0).random(len(score)) < 0.15] = np.nan
    t = t.set_column(t.schema.get_field_index("score"), "score", pa.array(score))
    blocks = blocks_of(t, [500, 0, 700])
    bounds = choose_boundaries([sort_key_sample(b, SORT_KEYS, 16) for b in blocks], SORT_KEYS, partitions)
    cut = [partition_block(b, SORT_KEYS, bounds) for b in blocks]
    merged = [merge_sorted([c[p] for c in cut], SORT_KEYS) for p in range(len(bounds) + 1)]
    sizes, offsets = rank_offsets([block_counts(m) for m in merged])
    got = pa.concat_tables([assign_ranks(m, so, co, sizes) for m, (so, co) in zip(merged, offsets)])
    rows = got.to_pylist()
    for split in ("ood", "test", "train"):
        mine = [r for r in rows if r["split"] == split]
        scored = sorted((r for r in mine if not np.isnan(r["score"])), key=lambda r: (-r["score"], r["id"]))
        assert sizes[split] == len(scored)
        assert [r["id"] for r in mine[:len(scored)]] == [r["id"] for r in scored]   # NaN rows last
        for i, r in enumerate(scored, 1):
            assert r["rank"] == i and r["percentile"] == 100.0 * (len(scored) - i + 1) / len(scored)
            assert r["decile"] == 10 - (10 * (i - 1)) // len(scored)
        assert all(r["rank"] is r["class_rank"] is r["percentile"] is r["decile"] is None
                   for r in mine[len(scored):]) and len(mine) > len(scored)
    assert got.drop_columns(["score"]).equals(rank_table(t).drop_columns(["score"]))   # NaN != NaN


def test_rows_equal_to_a_boundary_all_go_to_one_part():
    keys = [("split", "ascending"), ("id", "ascending")]
    t = pa.table({"split": ["a"] * 6, "id": ["1", "2", "2", "2", "3", "4"]})
    bounds = pa.table({"split": ["a"], "id": ["2"]})
    first, second = partition_block(t, keys, bounds)
    assert first["id"].to_pylist() == ["1", "2", "2", "2"] and second["id"].to_pylist() == ["3", "4"]


@pytest.mark.integration
def test_ray_sample_sort_and_ranks_equal_the_naive_reference(shared_ray, monkeypatch):
    """The Ray tasks (reduce.rank_dataset) on many blocks and several partitions: every column equals
    one in-memory sort + rank, and the split sizes are right."""
    import ray
    import ray.data

    from vog_ray.distributed import reduce

    t = table(5000, seed=7, ties=True)
    ds = ray.data.from_arrow(blocks_of(t, [1000] * 5))
    monkeypatch.setattr(reduce, "partitions_for", lambda n, per=100_000: 4)  # several partitions for 5,000 rows
    ranked, sizes = reduce.rank_dataset(ds, t.num_rows)
    got = pa.concat_tables([ray.get(r) for b in ranked.iter_internal_ref_bundles() for r in b.block_refs])
    assert got.equals(rank_table(t))
    assert sizes == {s: int(n) for s, n in zip(*np.unique(t["split"].to_numpy(zero_copy_only=False),
                                                           return_counts=True))}


def merge_moment_rows(t: pa.Table, vog_keys: list[str], num_groups: int | None = None) -> pa.Table:
    """The naive reference: ONE example's partial rows merged one at a time in ``group`` order
    with ``PixelMoments.merge`` (Chan); signals concatenated in checkpoint order; prediction and
    target from the last group. (What the sharded/incremental merge did per example before it was
    vectorised as ``merge.merge_examples``.)"""
    t = t.sort_by([("group", "ascending")])
    if num_groups is not None and t.num_rows != num_groups:
        raise RuntimeError(f"example {t['id'][0].as_py()!r}: expected {num_groups} partial rows, got {t.num_rows}")
    cols: dict[str, Any] = {c: t[c].slice(t.num_rows - 1, 1) for c in t.column_names
                            if c in ("id", "split", "label", "status", "target_label", "pred")}
    cols["group"] = pa.array([0], pa.int64())
    for k in vog_keys:
        st = PixelMoments(0, np.zeros((1, 1)), np.zeros((1, 1)))
        ns = t[f"mn_{k}"].to_numpy()
        means, m2s = _list_values(t[f"mmean_{k}"]), _list_values(t[f"mm2_{k}"])
        for i in range(t.num_rows):
            if ns[i] == 0:
                continue
            part = PixelMoments(int(ns[i]), means[i:i + 1].astype(np.float64), m2s[i:i + 1].astype(np.float64))
            st = st.merge(part) if st.n else part
        if st.n == 0:
            st = PixelMoments(0, np.zeros((1, means.shape[1])), np.zeros((1, means.shape[1])))
        cols[f"mn_{k}"] = pa.array([st.n], pa.int64())
        cols[f"mmean_{k}"] = _fsl(st.mean)
        cols[f"mm2_{k}"] = _fsl(st.m2)
    for c in t.column_names:
        if c.startswith("sig_"):  # rows may hold different numbers of checkpoints
            v = np.concatenate([np.asarray(r) for r in t[c].to_pylist()])
            cols[c] = _fsl(v.reshape(1, -1))
    for c in t.column_names:
        if c not in cols and c not in _STATE_META and not c.startswith(_MOMENT_PREFIXES):
            cols[c] = t[c].slice(0, 1)
    return pa.table(cols)


@pytest.mark.parametrize("groups", [2, 3])
def test_vectorised_example_merge_equals_the_per_example_merge(groups):
    """merge.merge_examples (all examples at once) == merge_moment_rows (one example at a
    time, PixelMoments.merge): the same bits, including groups with n = 0 (an empty window)."""
    from vog_ray.distributed.merge import merge_examples as _merge_examples

    rng = np.random.default_rng(groups)
    E, P, keys = 7, 5, ["all_logit", "early_logit"]
    rows = []
    for e in range(E):
        for g in range(groups):
            k_g = g + 1  # group g holds g + 1 checkpoints
            row = {"id": f"ex{e}", "split": "train", "label": e % 3, "status": "ok", "group": g,
                   "target_label": e % 3, "pred": (e + g) % 3, "keep": f"k{e}",
                   "sig_loss": rng.random((1, k_g)).astype(np.float32)}
            for k in keys:
                n = int(rng.integers(0, 3)) if k == "early_logit" else k_g  # early: sometimes empty
                row[f"mn_{k}"] = n
                row[f"mmean_{k}"] = rng.normal(size=(1, P)) if n else np.zeros((1, P))
                row[f"mm2_{k}"] = rng.random((1, P)) * n
            rows.append(row)

    def table(rs):
        cols = {c: pa.array([r[c] for r in rs]) for c in ("id", "split", "label", "status", "group",
                                                           "target_label", "pred", "keep")}
        for k in keys:
            cols[f"mn_{k}"] = pa.array([r[f"mn_{k}"] for r in rs], pa.int64())
            cols[f"mmean_{k}"] = _fsl(np.concatenate([r[f"mmean_{k}"] for r in rs]))
            cols[f"mm2_{k}"] = _fsl(np.concatenate([r[f"mm2_{k}"] for r in rs]))
        cols["sig_loss"] = pa.array([list(map(float, r["sig_loss"][0])) for r in rs], pa.list_(pa.float32()))
        return pa.table(cols)

    t = table(rows)
    got = _merge_examples(t, keys, groups)
    assert got.num_rows == E
    for e in range(E):
        want = merge_moment_rows(t.slice(e * groups, groups), keys, groups)
        for k in keys:
            for c in (f"mn_{k}", f"mmean_{k}", f"mm2_{k}"):
                a = np.asarray(got[c][e].as_py(), np.float64)
                b = np.asarray(want[c][0].as_py(), np.float64)
                assert np.array_equal(a, b), (e, c)  # bit for bit
        assert np.allclose(got["sig_loss"][e].as_py(), want["sig_loss"][0].as_py())
        for c in ("id", "pred", "keep", "target_label"):
            assert got[c][e].as_py() == want[c][0].as_py(), c
    with pytest.raises(RuntimeError, match=f"example 'ex1': expected {groups} partial rows, got {groups - 1}"):
        _merge_examples(t.slice(0, 2 * groups - 1), keys, groups)  # ex1 lost a row


def test_a_signal_missing_from_an_incremental_state_is_nan_for_its_checkpoints():
    """The state (group 0) was written before a signal existed: its checkpoints get NaN, the new
    checkpoints (group 1) their values, in checkpoint order."""
    from vog_ray.distributed.merge import merge_examples as _merge_examples

    E = 3
    rows = {"id": [f"ex{e}" for e in range(E) for _ in (0, 1)], "split": ["train"] * 2 * E,
            "label": [0] * 2 * E, "status": ["ok"] * 2 * E, "group": [0, 1] * E,
            "target_label": [0] * 2 * E, "pred": [0] * 2 * E, "mn_all_logit": [2, 1] * E}
    t = pa.table({**rows, "mmean_all_logit": _fsl(np.zeros((2 * E, 4))), "mm2_all_logit": _fsl(np.ones((2 * E, 4))),
                  "sig_loss": pa.array([[0.1, 0.2], [0.3]] * E, pa.list_(pa.float32())),
                  "sig_el2n": pa.array([None, [0.5]] * E, pa.list_(pa.float32()))})
    got = _merge_examples(t, ["all_logit"], 2)
    el2n = _list_values(got["sig_el2n"])
    assert el2n.shape == (E, 3) and el2n.dtype == np.float32
    assert np.isnan(el2n[:, :2]).all() and (el2n[:, 2] == np.float32(0.5)).all()
    assert np.allclose(_list_values(got["sig_loss"]), [[0.1, 0.2, 0.3]] * E)


def test_adjacent_duplicates_counts_each_repeated_key_once():
    from vog_ray.distributed.sort import adjacent_duplicates as _adjacent_duplicates

    t = pa.table({"split": ["a", "a", "a", "a", "b", "b", "b", "c"],
                  "id": ["1", "2", "2", "2", "1", "3", "3", "3"]})
    got = _adjacent_duplicates(t)
    assert got.to_pylist() == [{"split": "a", "id": "2", "n": 3}, {"split": "b", "id": "3", "n": 2}]  # c/3 is another split
    # the same id in two splits is no repeat; empty and one-row partitions have none
    assert _adjacent_duplicates(pa.table({"split": ["a", "b"], "id": ["1", "1"]})).num_rows == 0
    assert _adjacent_duplicates(t.slice(0, 0)).num_rows == 0 and _adjacent_duplicates(t.slice(0, 1)).num_rows == 0
