"""The paper's toy experiment: VoG is high near the decision boundary (Agarwal et al., §3).

Three Gaussian blobs in 2-D (``make_blobs(500, cluster_std=2, random_state=212)``), blob 0 is
class 0 and blobs 1 and 2 are class 1; a small MLP is trained full-batch for 15 epochs with one
checkpoint per epoch; VoG (softmax target, all 15 checkpoints, class-normalised) of the 50 test
points is compared with each point's distance to the trained model's decision boundary, found
from the model itself (ray casting + bisection on ``logit_1 - logit_0``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.datasets import make_blobs

import vog_ray
from vog_ray.models import build_model

SPEC = {"name": "mlp", "in_features": 2, "hidden": [16, 16], "num_classes": 2, "activation": "relu"}
EPOCHS = 15
LR = 0.05


def boundary_distance(model, pts, *, radius=60.0, n_dir=180, n_steps=240, n_bisect=30):
    """Distance from each point to the nearest point where the two logits are equal.

    For ``n_dir`` directions, march out to ``radius`` and find the first sign change of
    ``logit_1 - logit_0``; refine by bisection; take the minimum over directions.
    """
    model = model.double().eval()
    pts = torch.as_tensor(np.asarray(pts), dtype=torch.float64)

    def f(z):
        with torch.no_grad():
            out = model(z.reshape(-1, 2))
        return (out[:, 1] - out[:, 0]).reshape(z.shape[:-1])

    th = torch.linspace(0, 2 * np.pi, n_dir + 1, dtype=torch.float64)[:-1]
    u = torch.stack([th.cos(), th.sin()], dim=1)                                   # [D, 2]
    r = torch.linspace(0, radius, n_steps + 1, dtype=torch.float64)                # [S]
    v = f(pts[:, None, None, :] + r[None, None, :, None] * u[None, :, None, :])   # [N, D, S]
    s0 = torch.sign(v[:, :, 0])
    crossed = torch.sign(v) != s0[..., None]
    has = crossed.any(dim=2)
    first = crossed.to(torch.int8).argmax(dim=2)
    lo, hi = r[(first - 1).clamp(min=0)], r[first]
    for _ in range(n_bisect):
        mid = (lo + hi) / 2
        same = torch.sign(f(pts[:, None, :] + mid[..., None] * u[None])) == s0
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    d = torch.where(has, (lo + hi) / 2, torch.full_like(lo, np.inf)).min(dim=1).values
    return d.numpy()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    X, blob = make_blobs(n_samples=500, n_features=2, cluster_std=2, random_state=212)
    X = X.astype(np.float32)
    y = (blob != 0).astype(np.int64)               # blob 0 -> class 0, blobs 1, 2 -> class 1
    perm = np.random.default_rng(0).permutation(500)
    tr, te = perm[:450], perm[450:]
    return X, y, tr, te, tmp_path_factory


def train_and_score(toy, seed: int):
    X, y, tr, te, tmp_factory = toy
    d = tmp_factory.mktemp(f"toy_seed{seed}")
    torch.manual_seed(seed)
    model = build_model(SPEC)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    xt, yt = torch.from_numpy(X[tr]), torch.from_numpy(y[tr])
    for ep in range(1, EPOCHS + 1):             # full batch: one step per epoch
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
        torch.save(model.state_dict(), d / f"epoch_{ep}.pt")
    model.eval()
    with torch.no_grad():
        acc_tr = float((model(xt).argmax(1) == yt).float().mean())
        pred_te = model(torch.from_numpy(X[te])).argmax(1).numpy()
    t = vog_ray.score(X[te], y[te], model=SPEC, checkpoints=str(d / "epoch_*.pt"), targets="softmax",
                      windows={"all": "all"}, device="cpu", ids=[str(i) for i in range(len(te))])
    assert t.num_rows == len(te) == 50
    z = np.empty(len(te))
    z[np.asarray(t.column("id").to_pylist()).astype(int)] = t.column("z_all_softmax").to_numpy()
    dist = boundary_distance(model, X[te])
    # sanity of the distance: a segment between two test points predicted differently crosses the
    # boundary, so each point's distance is at most the distance to its nearest such point
    pw = np.linalg.norm(X[te][:, None] - X[te][None], axis=2)
    other = np.where(pred_te[:, None] != pred_te[None], pw, np.inf).min(axis=1)
    assert np.all(np.isfinite(dist)) and np.all(dist <= other + 1e-6)
    rho = float(spearmanr(z, dist).correlation)
    return rho, acc_tr, float((pred_te == y[te]).mean())


def test_toy_vog_is_high_near_the_decision_boundary(toy):
    results = [train_and_score(toy, seed) for seed in (0, 1, 2)]
    for seed, (rho, acc_tr, acc_te) in zip((0, 1, 2), results):
        print(f"toy seed {seed}: Spearman(z_all_softmax, distance to boundary) = {rho:+.3f} "
              f"(train acc {acc_tr:.3f}, test acc {acc_te:.3f})")
    rhos = [r[0] for r in results]
    print(f"toy: median Spearman over 3 init seeds = {np.median(rhos):+.3f}")
    assert results[0][0] < -0.7
    assert np.median(rhos) < -0.7
