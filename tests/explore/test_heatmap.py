"""VoG heat maps (``vog_ray.vog_map``): on a real Ray audit, each map's pixel mean equals the
example's raw VoG in the score table to 1e-5 (every key, both splits), and the map itself equals a
naive float64 reference (autograd per checkpoint, per-pixel population std in numpy). Predicted
labels with the predicting checkpoint outside the window; a checkpoint changed since the audit is
refused, naming it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import vog_ray
from vog_ray.explore.heatmap import HeatMapError, vog_maps
from vog_ray.runs import open_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOL = 1e-5


def _table(run_url: str, split: str):
    t = open_run(run_url).scores().to_pandas()
    return t[t.split == split]


@pytest.mark.parametrize("split", ["train", "test"])
def test_pixel_mean_is_the_table_vog_for_every_key(explore_run, split):
    run = open_run(explore_run.url)
    part = _table(explore_run.url, split)
    ids = part.sort_values("rank").id.tolist()
    ids = ids[:4] + ids[-3:] + ids[len(ids) // 2: len(ids) // 2 + 3]
    for key in run.manifest["keys"]:
        maps = vog_maps(run, ids, split=split, key=key)
        for i in ids:
            m, want = maps[i], float(part.loc[part.id == i, f"vog_{key}"].iloc[0])
            assert m.map.shape == (8, 8) and m.table_vog == want
            assert abs(m.vog - want) <= TOL * abs(want), (key, i, m.vog, want)
            assert m.target_label == int(part.loc[part.id == i, "target_label"].iloc[0])


def _reference_map(model_spec, ckpts: list[str], img: np.ndarray, target: int, logit: bool) -> np.ndarray:
    """Per checkpoint: d(target score)/d(input) in float64, channel mean; then the population std."""
    from vog_ray.models import build_model

    x = torch.tensor(img.astype(np.float64)[None, None] / 255.0, requires_grad=True)
    maps = []
    for p in ckpts:
        model = build_model(model_spec).double().eval()
        model.load_state_dict(torch.load(p, weights_only=True))
        out = model(x)
        score = out[0, target] if logit else torch.softmax(out, dim=1)[0, target]
        (g,) = torch.autograd.grad(score, x)
        maps.append(g[0].mean(dim=0).numpy())
    return np.std(np.stack(maps), axis=0)   # ddof = 0


def test_map_equals_a_naive_float64_reference(explore_run):
    run = open_run(explore_run.url)
    m = run.manifest
    ckpts = [c["url"] for c in m["checkpoints"]]
    part = _table(explore_run.url, "train")
    ids = part.sort_values("rank").id.tolist()[:3]
    for key in ("late_logit", "all_softmax"):
        window = key.rsplit("_", 1)[0]
        maps = vog_maps(run, ids, split="train", key=key)
        for i in ids:
            target = int(part.loc[part.id == i, "target_label"].iloc[0])
            ref = _reference_map(m["config"]["model"], [ckpts[j] for j in m["windows"][window]],
                                 explore_run.images["train"][i], target, key.endswith("logit"))
            np.testing.assert_allclose(maps[i].map, ref, rtol=1e-4, atol=1e-5 * ref.max())


def test_vog_map_from_the_package(explore_run):
    part = _table(explore_run.url, "test")
    row = part.sort_values("rank").iloc[0]
    m = vog_ray.vog_map(explore_run.url, row.id, split="test")     # the ranked key by default
    assert m.key == open_run(explore_run.url).manifest["primary"]
    assert abs(m.vog - row[f"vog_{m.key}"]) <= TOL * abs(row[f"vog_{m.key}"])
    assert m.image is not None and m.image.shape == (8, 8) and m.image.dtype == np.uint8
    np.testing.assert_array_equal(m.image, explore_run.images["test"][row.id])
    with pytest.raises(HeatMapError, match="no scored example"):
        vog_ray.vog_map(explore_run.url, "no-such-id")


def test_changed_checkpoint_is_refused(explore_run, tmp_path):
    """A copy of the run whose first checkpoint was rewritten after the audit."""
    src = open_run(explore_run.url)
    dst = tmp_path / "run"
    shutil.copytree(src.url, dst)
    man = json.loads((dst / "manifest.json").read_text())
    for n, c in enumerate(man["checkpoints"]):
        copy = tmp_path / f"ckpt_{n}.pt"
        shutil.copy(c["url"], copy)
        c["url"] = str(copy)
    (dst / "manifest.json").write_text(json.dumps(man))
    sd = torch.load(man["checkpoints"][0]["url"], weights_only=True)
    torch.save({k: v + 1e-3 if v.is_floating_point() else v for k, v in sd.items()}, man["checkpoints"][0]["url"])
    part = _table(explore_run.url, "train")
    with pytest.raises(HeatMapError, match="ckpt_0.pt.*changed since the audit"):
        vog_maps(str(dst), part.id.tolist()[:1], split="train", key="all_logit")
    # a window without that checkpoint is still served
    m = vog_maps(str(dst), part.id.tolist()[:1], split="train", key="late_logit")
    assert len(m) == 1


def test_predicted_labels_outside_the_window(tmp_path):
    """label_mode predicted, window early (first 3 of 6): the predicting checkpoint is not in it."""
    import runfactory as rf

    url = rf.digits_run(str(tmp_path), label_mode="predicted", targets=("softmax",), epochs=12, ood=True)
    for split in ("ood_noise", "train"):
        part = _table(url, split)
        ids = part.id.tolist()[:5]
        maps = vog_maps(url, ids, split=split, key="early_softmax")
        for i in ids:
            row = part[part.id == i].iloc[0]
            assert abs(maps[i].vog - row.vog_early_softmax) <= TOL * abs(row.vog_early_softmax)
            assert maps[i].target_label == row.target_label == row.pred
