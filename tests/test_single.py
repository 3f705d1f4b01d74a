"""``vog_ray.score``: invariances, class normalisation, bad input, per-checkpoint signals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vog_ray
from vog_ray.models import build_model

SPEC = {"name": "lenet", "num_classes": 10}
N = 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("score_ckpts")
    for i, seed in enumerate([5, 6, 7]):
        torch.manual_seed(seed)
        torch.save(build_model(SPEC).state_dict(), d / f"epoch_{i + 1}.pt")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, size=N)
    y[:8] = 3  # one well-populated class
    return {"glob": str(d / "epoch_*.pt"), "x": x, "y": y,
            "urls": [str(d / f"epoch_{i}.pt") for i in (1, 2, 3)]}


def col_by_id(table, col):
    ids = [str(i) for i in table.column("id").to_pylist()]
    vals = table.column(col).to_pylist()
    return dict(zip(ids, vals))


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def z_error(table, ref_table, col, ids) -> float:
    """Error of a z column relative to its sensitivity to a relative VoG error.

    z = (v - m_c) / s_c, so a relative error δ in the VoG values moves z by ≈ δ (|z| + m_c / s_c):
    the error below is comparable with the relative error of the VoG column itself.
    """
    key = col[2:] if col.startswith("z_") else "late_logit"
    v = aligned(ref_table, f"vog_{key}", ids)
    labels = aligned(ref_table, "target_label", ids)  # the class used for normalisation
    amp = np.zeros(len(ids))
    for c in np.unique(labels):
        sel = labels == c
        s = np.std(v[sel])
        amp[sel] = np.mean(v[sel]) / s if s > 0 else 0.0
    a, b = aligned(table, col, ids), aligned(ref_table, col, ids)
    return float(np.max(np.abs(a - b) / (np.abs(b) + amp + 1e-300)))


def aligned(table, col, ids):
    m = col_by_id(table, col)
    return np.array([m[str(i)] for i in ids], dtype=np.float64)


KW = dict(windows={"all": "all", "late": "last:2"}, targets=["logit", "softmax"], device="cpu")
VCOLS = ["vog_all_logit", "vog_all_softmax", "vog_late_logit", "vog_late_softmax",
         "z_all_logit", "z_all_softmax", "z_late_logit", "z_late_softmax", "score"]


def test_batch_size_and_order_invariance(setup):
    x, y, glob = setup["x"], setup["y"], setup["glob"]
    ids = [f"ex{i:03d}" for i in range(N)]
    base = vog_ray.score(x, y, model=SPEC, checkpoints=glob, batch_size=N, ids=ids, **KW)
    assert base.num_rows == N and set(base.column("status").to_pylist()) == {"ok"}
    worst = 0.0
    for bs in (1, 5, 7):
        t = vog_ray.score(x, y, model=SPEC, checkpoints=glob, batch_size=bs, ids=ids, **KW)
        for c in VCOLS:
            e = rel(aligned(t, c, ids), aligned(base, c, ids)) if c.startswith("vog") else \
                z_error(t, base, c, ids)
            worst = max(worst, e)
            assert e < 1e-6, (bs, c, e)
    perm = np.random.default_rng(1).permutation(N)
    t = vog_ray.score(x[perm], y[perm], model=SPEC, checkpoints=glob, batch_size=5,
                      ids=[ids[i] for i in perm], **KW)
    for c in VCOLS:
        e = rel(aligned(t, c, ids), aligned(base, c, ids)) if c.startswith("vog") else \
            z_error(t, base, c, ids)
        worst = max(worst, e)
        assert e < 1e-6, ("perm", c, e)
    # ranks: identical, except inside groups of (theoretically) tied scores — e.g. a class with two
    # members always gets z = ±1 — whose order is set by float rounding; each such group keeps
    # its set of ranks
    rank_b, rank_t, sc = col_by_id(base, "rank"), col_by_id(t, "rank"), col_by_id(base, "score")
    order = sorted(ids, key=lambda i: rank_b[i])
    groups, cur = [], [order[0]]
    for a, b in zip(order, order[1:]):
        if abs(sc[a] - sc[b]) <= 1e-9 * (1 + abs(sc[a])):
            cur.append(b)
        else:
            groups.append(cur)
            cur = [b]
    groups.append(cur)
    for g in groups:
        assert sorted(rank_t[i] for i in g) == sorted(rank_b[i] for i in g), g
    print(f"batch sizes 1/5/7 and a permutation vs one batch: max relative error {worst:.2e} "
          "(VoG columns; z columns relative to their sensitivity |z| + m_c/s_c)")


def test_z_scores_ranks_and_normalizations(setup):
    x, y, glob = setup["x"], setup["y"], setup["glob"]
    t = vog_ray.score(x, y, model=SPEC, checkpoints=glob, **KW)
    ids = [str(i) for i in range(N)]
    worst = 0.0
    for key in ("all_logit", "late_softmax"):
        v = aligned(t, f"vog_{key}", ids)
        z = aligned(t, f"z_{key}", ids)
        ref = np.zeros(N)
        for c in np.unique(y):
            sel = y == c
            s = np.std(v[sel], ddof=0)
            ref[sel] = 0.0 if len(v[sel]) == 1 or s == 0 else (v[sel] - np.mean(v[sel])) / s
        worst = max(worst, float(np.max(np.abs(z - ref))))
    assert worst < 1e-9
    # default primary is the "late" window, first target; rank 1 = highest score
    score = aligned(t, "score", ids)
    np.testing.assert_array_equal(score, aligned(t, "z_late_logit", ids))
    rank = aligned(t, "rank", ids).astype(int)
    assert sorted(rank) == list(range(1, N + 1))
    assert np.all(np.diff(score[np.argsort(rank)]) <= 0)
    print(f"z columns vs manual per-class z (ddof=0): max abs error {worst:.2e}")
    t_none = vog_ray.score(x, y, model=SPEC, checkpoints=glob, normalization="none", **KW)
    np.testing.assert_array_equal(aligned(t_none, "z_all_logit", ids), aligned(t_none, "vog_all_logit", ids))
    t_abs = vog_ray.score(x, y, model=SPEC, checkpoints=glob, normalization="abs_zscore", **KW)
    np.testing.assert_allclose(aligned(t_abs, "z_all_logit", ids), np.abs(aligned(t, "z_all_logit", ids)),
                               atol=1e-12)


def test_normalize_against_a_reference_split(setup):
    """z of every split against the reference split's class moments: the reference split's own z
    is unchanged; another split's z is (raw - ref class mean) / ref class std, computed naively in
    float64 from the raw VoG; a class the reference split lacks gets z = NaN and no rank."""
    x, glob = setup["x"], setup["glob"]
    y = np.array([3] * 8 + [1, 2] * 4 + [3, 1, 2, 9] * 2)     # class 9 only in "new"
    split = ["ref"] * 16 + ["new"] * 8
    ids = [f"e{i:02d}" for i in range(N)]
    t = vog_ray.score(x, y, model=SPEC, checkpoints=glob, ids=ids, split=split, normalize_against="ref", **KW)
    alone = vog_ray.score(x[:16], y[:16], model=SPEC, checkpoints=glob, ids=ids[:16], split="ref", **KW)
    ref_ids, new_ids = ids[:16], ids[16:]
    worst = 0.0
    for key in ("all_logit", "late_softmax"):
        np.testing.assert_array_equal(aligned(t, f"z_{key}", ref_ids), aligned(alone, f"z_{key}", ref_ids))
        v_ref, v_new = aligned(t, f"vog_{key}", ref_ids), aligned(t, f"vog_{key}", new_ids)
        want = np.full(8, np.nan)
        for i in range(8):
            members = [float(v) for v, c in zip(v_ref, y[:16]) if c == y[16 + i]]
            if members:
                mean = sum(members) / len(members)
                std = (sum((m - mean) ** 2 for m in members) / len(members)) ** 0.5
                want[i] = (v_new[i] - mean) / std
        got = aligned(t, f"z_{key}", new_ids)
        np.testing.assert_array_equal(np.isnan(got), y[16:] == 9)
        worst = max(worst, float(np.nanmax(np.abs(got - want) / np.maximum(np.abs(want), 1.0))))
    assert worst < 1e-12
    rank = col_by_id(t, "rank")
    assert [rank[i] for i, c in zip(new_ids, y[16:]) if c == 9] == [None, None]
    assert sorted(rank[i] for i, c in zip(new_ids, y[16:]) if c != 9) == list(range(1, 7))
    with pytest.raises(ValueError, match="normalize_against 'test' is not one of the splits"):
        vog_ray.score(x, y, model=SPEC, checkpoints=glob, split=split, normalize_against="test", **KW)
    print(f"z against the reference split vs naive float64: max error {worst:.1e} (relative, or absolute "
          "below |z| = 1)")


# --------------------------------------------------------------------------- bad input
def test_wrong_input_shape_names_shape(setup):
    for bad in (np.zeros((4, 3, 32, 32), np.float32), np.zeros((4, 1, 20, 20), np.float32)):
        with pytest.raises(ValueError, match="shape") as ei:
            vog_ray.score(bad, np.zeros(4, int), model=SPEC, checkpoints=setup["glob"], device="cpu")
        print(f"wrong shape {bad.shape[1:]}: {str(ei.value)[:120]}")


def test_labels_outside_range_name_the_range(setup):
    x = setup["x"][:4]
    with pytest.raises(ValueError, match=r"\[0, 10\)") as ei:
        vog_ray.score(x, np.array([0, 1, 10, 2]), model=SPEC, checkpoints=setup["glob"], device="cpu")
    print(f"label 10: {ei.value}")
    with pytest.raises(ValueError, match=r"\[0, ") as ei:
        vog_ray.score(x, np.array([0, -3, 1, 2]), model=SPEC, checkpoints=setup["glob"], device="cpu")
    print(f"label -3: {ei.value}")


@pytest.mark.parametrize("label_mode", ["true", "predicted"])
def test_non_finite_rows_are_flagged_and_isolated(setup, label_mode):
    x, y, glob = setup["x"].copy(), setup["y"], setup["glob"]
    bad = [2, 9, 17]
    x[2, 0, 5, 5] = np.nan
    x[9, 0, 0, 0] = np.inf
    x[17, 0, 27, 27] = -np.inf
    ids = [str(i) for i in range(N)]
    t = vog_ray.score(x, y, model=SPEC, checkpoints=glob, batch_size=10, label_mode=label_mode, **KW)
    assert t.num_rows == N
    status = col_by_id(t, "status")
    assert {i for i, s in status.items() if s != "ok"} == {str(i) for i in bad}
    assert all(status[str(i)] == "non_finite_input" for i in bad)
    for c in ("vog_all_logit", "vog_late_softmax"):
        v = col_by_id(t, c)
        assert all(v[str(i)] is None or np.isnan(v[str(i)]) for i in bad), c
    for c in ("z_all_logit", "score", "rank"):
        v = col_by_id(t, c)
        assert all(v[str(i)] is None or np.isnan(v[str(i)]) for i in bad), c
    # the other rows: identical to an audit of the clean rows alone (values and class stats)
    good = [i for i in range(N) if i not in bad]
    clean = vog_ray.score(setup["x"][good], y[good], model=SPEC, checkpoints=glob, ids=[str(i) for i in good],
                          label_mode=label_mode, **KW)
    gids = [str(i) for i in good]
    worst = 0.0
    for c in VCOLS:
        a, b = aligned(t, c, gids), aligned(clean, c, gids)
        e = rel(a, b) if c.startswith("vog") else z_error(t, clean, c, gids)
        worst = max(worst, e)
        assert e < 1e-6, (c, e)
    assert sorted(aligned(t, "rank", gids).astype(int)) == list(range(1, len(good) + 1))
    print(f"{label_mode}: non-finite rows {bad} flagged; other rows vs clean-only audit max error {worst:.2e}")


def test_zero_checkpoints_and_oversized_window(setup):
    x, y = setup["x"][:4], setup["y"][:4]
    with pytest.raises((ValueError, FileNotFoundError), match="checkpoint") as ei:
        vog_ray.score(x, y, model=SPEC, checkpoints=[], device="cpu")
    print(f"zero checkpoints: {ei.value}")
    with pytest.raises(ValueError, match="late") as ei:
        vog_ray.score(x, y, model=SPEC, checkpoints=setup["glob"], windows={"late": "last:5"}, device="cpu")
    print(f"oversized window: {ei.value}")
    with pytest.raises(ValueError, match="future") as ei:
        vog_ray.score(x, y, model=SPEC, checkpoints=setup["glob"], windows={"future": [0, 3]}, device="cpu")
    print(f"window index past the end: {ei.value}")


# --------------------------------------------------------------------------- signals
def test_per_checkpoint_signals_match_direct_torch(setup):
    x, y = setup["x"], setup["y"]
    t = vog_ray.score(x, y, model=SPEC, checkpoints=setup["urls"], device="cpu", batch_size=7)
    rows = [0, 5, 13, 23]
    ids = [str(i) for i in rows]
    got = {s: np.array([col_by_id(t, f"sig_{s}")[i] for i in ids], dtype=np.float64)
           for s in ("loss", "label_prob", "label_logit", "margin", "max_prob", "max_logit", "energy",
                     "el2n", "entropy", "pred", "correct")}
    ref = {k: np.zeros((len(rows), 3)) for k in got}
    for k, url in enumerate(setup["urls"]):
        m = build_model(SPEC)
        m.load_state_dict(torch.load(url, weights_only=True))
        m = m.double().eval()
        with torch.no_grad():
            z = m(torch.from_numpy(x[rows]).double())
        yt = torch.from_numpy(y[rows])
        p = torch.softmax(z, dim=1)
        ref["loss"][:, k] = torch.nn.functional.cross_entropy(z, yt, reduction="none").numpy()
        ref["label_prob"][:, k] = p[torch.arange(len(rows)), yt].numpy()
        ref["label_logit"][:, k] = z[torch.arange(len(rows)), yt].numpy()
        other = z.clone()
        other[torch.arange(len(rows)), yt] = -np.inf
        ref["margin"][:, k] = (z[torch.arange(len(rows)), yt] - other.max(dim=1).values).numpy()
        ref["max_prob"][:, k] = p.max(dim=1).values.numpy()
        ref["max_logit"][:, k] = z.max(dim=1).values.numpy()
        ref["energy"][:, k] = (-torch.logsumexp(z, dim=1)).numpy()
        onehot = torch.nn.functional.one_hot(yt, z.shape[1]).double()
        ref["el2n"][:, k] = torch.sqrt(((p - onehot) ** 2).sum(dim=1)).numpy()
        ref["entropy"][:, k] = (-(p * torch.log(p)).sum(dim=1)).numpy()
        ref["pred"][:, k] = z.argmax(dim=1).numpy()
        ref["correct"][:, k] = (z.argmax(dim=1) == yt).numpy()
    worst = {}
    for s in got:
        assert got[s].shape == (len(rows), 3), (s, got[s].shape)
        if s in ("pred", "correct"):
            np.testing.assert_array_equal(got[s], ref[s], err_msg=s)
            worst[s] = 0.0
        else:
            e = float(np.max(np.abs(got[s] - ref[s]) / np.maximum(np.abs(ref[s]), 1e-3)))
            worst[s] = e
            assert e < 1e-4, (s, e)
    # the row-level pred/correct come from the last checkpoint
    np.testing.assert_array_equal([col_by_id(t, "pred")[i] for i in ids], ref["pred"][:, -1])
    np.testing.assert_array_equal([col_by_id(t, "correct")[i] for i in ids], ref["correct"][:, -1].astype(bool))
    print("signals vs direct float64 torch, max relative error: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
