"""Model registry and checkpoint loading: formats, URLs, natural order, safety, clear errors."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import vog_ray
from vog_ray.models.checkpoints import CheckpointError, list_checkpoints, load_into, load_state_dict
from vog_ray.models import build_model
from vog_ray.models.checkpoints import load_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[2]
MLP = {"name": "mlp", "in_features": 6, "hidden": [5, 4], "num_classes": 3, "activation": "tanh"}


def mlp_sd(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in build_model(MLP).state_dict().items()}


def assert_same_sd(a, b):
    assert set(a) == set(b), (sorted(a), sorted(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- registry
def test_registry_builds_each_model(monkeypatch):
    m = build_model(MLP)
    lin = [l for l in m.modules() if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(6, 5), (5, 4), (4, 3)]
    assert sum(isinstance(l, nn.Tanh) for l in m.modules()) == 2
    assert not any(isinstance(l, nn.ReLU) for l in m.modules())
    assert build_model({"name": "mlp", "in_features": 2, "hidden": [8], "num_classes": 2})(
        torch.zeros(3, 2)).shape == (3, 2)
    assert build_model("lenet")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert build_model({"name": "resnet18_cifar", "num_classes": 7, "width": 4})(
        torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert build_model({"name": "small_cnn", "num_classes": 4, "size": 8})(
        torch.zeros(2, 1, 8, 8)).shape == (2, 4)
    tv = build_model({"name": "torchvision:resnet18", "num_classes": 5}).eval()
    assert type(tv).__name__ == "ResNet" and tv.fc.out_features == 5
    assert tv(torch.zeros(1, 3, 64, 64)).shape == (1, 5)
    # an explicitly named factory, with kwargs (tests/ importable from the repo root)
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    f = build_model({"name": "tests.helpers_factory:make", "in_features": 3, "width": 11, "num_classes": 4})
    assert f[0].in_features == 3 and f[0].out_features == 11 and f[2].out_features == 4
    f2 = build_model({"name": "tests.helpers_factory:make", "kwargs": {"width": 2}})
    assert f2[0].out_features == 2
    with pytest.raises(TypeError, match="not nn.Module"):
        build_model("tests.helpers_factory:not_a_model")
    with pytest.raises(ValueError, match="no callable"):
        build_model("tests.helpers_factory:missing")
    with pytest.raises(ValueError, match="cannot be imported"):
        build_model("no_such_pkg_xyz.mod:make")
    print("registry: mlp, lenet, resnet18_cifar, small_cnn, torchvision:resnet18, factory all built")


def test_unknown_model_errors():
    with pytest.raises(ValueError) as ei:
        build_model("resnet9000")
    msg = str(ei.value)
    print(f"unknown model: {msg}")
    assert "resnet9000" in msg and "lenet" in msg and "torchvision:" in msg
    with pytest.raises(ValueError, match="nosuchnet"):
        build_model("torchvision:nosuchnet")
    with pytest.raises(ValueError, match="name"):
        build_model({"in_features": 2})


# --------------------------------------------------------------------------- listing / URLs
def test_natural_order_from_glob_local_and_file_url(tmp_path):
    for e in (10, 2, 1, 33, 3):
        sd = mlp_sd(0)
        sd["net.1.bias"] = torch.full_like(sd["net.1.bias"], float(e))  # encodes the epoch
        torch.save(sd, tmp_path / f"epoch_{e}.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    urls = list_checkpoints(str(tmp_path / "epoch_*.pt"))
    names = [os.path.basename(u) for u in urls]
    print(f"natural order: {names}")
    assert names == ["epoch_1.pt", "epoch_2.pt", "epoch_3.pt", "epoch_10.pt", "epoch_33.pt"]
    furls = list_checkpoints(f"file://{tmp_path}/epoch_*.pt")
    assert [os.path.basename(u) for u in furls] == names
    loaded = load_checkpoints(MLP, f"file://{tmp_path}/epoch_*.pt")
    assert [float(sd["net.1.bias"][0]) for sd in loaded.state_dicts] == [1, 2, 3, 10, 33]
    # a single file:// URL and an explicit list keep the given order
    one = load_state_dict(f"file://{tmp_path}/epoch_10.pt")  # no model given: keys kept as saved
    assert_same_sd(one, {**mlp_sd(0), "net.1.bias": torch.full((5,), 10.0)})
    lst = list_checkpoints([str(tmp_path / "epoch_33.pt"), str(tmp_path / "epoch_2.pt")])
    assert [os.path.basename(u) for u in lst] == ["epoch_33.pt", "epoch_2.pt"]


def test_memory_urls():
    root = f"memory://vogtest-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    sds = [mlp_sd(s) for s in (1, 2, 3)]
    try:
        for e, sd in zip((2, 10, 1), sds):
            buf = __import__("io").BytesIO()
            torch.save(sd, buf)
            fs.pipe(f"{root}/ckpts/epoch_{e}.pt", buf.getvalue())
        loaded = load_checkpoints(MLP, f"{root}/ckpts/epoch_*.pt")
        names = [u.rsplit("/", 1)[-1] for u in loaded.urls]
        print(f"memory:// listing: {loaded.urls}")
        assert names == ["epoch_1.pt", "epoch_2.pt", "epoch_10.pt"]
        for got, want in zip(loaded.state_dicts, [sds[2], sds[0], sds[1]]):
            assert_same_sd(got, want)
        assert all(u.startswith("memory://") for u in loaded.urls)
        # score() end to end from memory://
        t = vog_ray.score(np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32), [0, 1, 2, 0],
                          model=MLP, checkpoints=f"{root}/ckpts/epoch_*.pt", device="cpu")
        assert t.num_rows == 4 and np.all(np.isfinite(t.column("vog_all_logit").to_numpy()))
    finally:
        fs.rm(root.replace("memory://", "/"), recursive=True)


def test_missing_file_and_empty_glob_name_the_url(tmp_path):
    missing = str(tmp_path / "nope" / "epoch_1.pt")
    with pytest.raises(FileNotFoundError) as ei:
        load_checkpoints(MLP, missing)
    print(f"missing file: {ei.value}")
    assert missing in str(ei.value)
    empty = str(tmp_path / "epoch_*.pt")
    with pytest.raises(FileNotFoundError) as ei:
        load_checkpoints(MLP, empty)
    print(f"empty glob: {ei.value}")
    assert empty in str(ei.value)
    mem = f"memory://vogtest-{uuid.uuid4().hex}/none_*.pt"
    with pytest.raises(FileNotFoundError, match="none_"):
        list_checkpoints(mem)


# --------------------------------------------------------------------------- formats
def test_checkpoint_formats_all_load_the_same_weights(tmp_path):
    sds = [mlp_sd(s) for s in (7, 8)]
    formats = {}
    for i, sd in enumerate(sds):
        for fmt in ("plain", "state_dict", "model", "lightning", "lightning_extra", "dataparallel",
                    "safetensors"):
            d = tmp_path / fmt
            d.mkdir(exist_ok=True)
            if fmt == "safetensors":
                save_file({k: v.contiguous() for k, v in sd.items()}, str(d / f"epoch_{i}.safetensors"))
                formats[fmt] = str(d / "epoch_*.safetensors")
                continue
            obj = {
                "plain": sd,
                "state_dict": {"state_dict": sd},
                "model": {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                          "epoch": i},
                "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                              "global_step": 120, "pytorch-lightning_version": "2.2.0",
                              "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
                              "lr_schedulers": [], "hyper_parameters": {"lr": 0.1, "hidden": [5, 4]}},
                # a LightningModule with another submodule (e.g. a loss with weights)
                "lightning_extra": {"state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                                                   "criterion.weight": torch.ones(3)}, "epoch": 3},
                "dataparallel": {f"module.{k}": v for k, v in sd.items()},
            }[fmt]
            torch.save(obj, d / f"epoch_{i}.pt")
            formats[fmt] = str(d / "epoch_*.pt")
    x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    ref = None
    for fmt, glob in formats.items():
        loaded = load_checkpoints(MLP, glob)
        assert len(loaded.state_dicts) == 2
        for got, want in zip(loaded.state_dicts, sds):
            assert_same_sd(got, want)
        t = vog_ray.score(x, y, model=MLP, checkpoints=glob, device="cpu", ids=[str(i) for i in range(8)])
        v = dict(zip(t.column("id").to_pylist(), t.column("vog_all_logit").to_pylist()))
        if ref is None:
            ref = v
        assert v == ref, fmt
    print(f"formats loaded identically: {sorted(formats)}")


def test_other_architecture_fails_naming_file_and_keys(tmp_path):
    torch.save(build_model("lenet").state_dict(), tmp_path / "lenet_1.pt")
    url = str(tmp_path / "lenet_1.pt")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoints(MLP, url)
    msg = str(ei.value)
    print(f"architecture mismatch: {msg[:200]}")
    assert url in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "net.1.weight" in msg and "features.0.weight" in msg
    # same keys, other shapes
    torch.manual_seed(0)
    other = build_model({**MLP, "hidden": [9, 4]}).state_dict()
    torch.save(other, tmp_path / "wide_1.pt")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoints(MLP, str(tmp_path / "wide_1.pt"))
    print(f"shape mismatch: {ei.value}")
    assert "wide_1.pt" in str(ei.value) and "shape" in str(ei.value)
    # and through score()
    with pytest.raises(CheckpointError, match="lenet_1.pt"):
        vog_ray.score(np.zeros((2, 6), np.float32), [0, 1], model=MLP, checkpoints=url, device="cpu")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_into(build_model(MLP), {"net.0.weight": torch.zeros(5, 6)}, "bad.pt")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _Custom:
    def __init__(self):
        self.secret = 42


def test_pickle_payloads_are_refused_and_never_run(tmp_path):
    sentinel = tmp_path / "pwned"
    sd = mlp_sd(0)
    torch.save({"state_dict": sd, "extra": _Evil(sentinel)}, tmp_path / "evil_1.pt")
    torch.save(_Evil(sentinel), tmp_path / "evil_2.pt")
    torch.save({"state_dict": sd, "meta": _Custom()}, tmp_path / "custom_1.pt")
    for name in ("evil_1.pt", "evil_2.pt", "custom_1.pt"):
        url = str(tmp_path / name)
        with pytest.raises(CheckpointError) as ei:
            load_checkpoints(MLP, url)
        assert url in str(ei.value) and "weights_only" in str(ei.value)
        with pytest.raises(CheckpointError):
            vog_ray.score(np.zeros((2, 6), np.float32), [0, 1], model=MLP, checkpoints=url, device="cpu")
        assert not sentinel.exists(), f"payload of {name} ran"
    print(f"refused: {str(ei.value)[:160]}")
    # control: the payload is live — an unsafe load (what the library must never do) runs it
    live = tmp_path / "live"
    torch.save(_Evil(live), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert live.exists(), "control payload did not run: the refusal test above would prove nothing"
    assert not sentinel.exists()


# --------------------------------------------------------------------------- planning
def test_planning_reads_each_checkpoint_once_and_holds_one(tmp_path, monkeypatch):
    """``inspect_checkpoints`` (what ``plan_audit`` runs): one read per file, the sha256 of the
    bytes on disk, every checkpoint checked against the model, one state_dict alive at a time."""
    import gc
    import hashlib
    import weakref

    import vog_ray.models.checkpoints as ck

    sds = [mlp_sd(s) for s in range(4)]
    for i, sd in enumerate(sds):
        torch.save(sd, tmp_path / f"epoch_{i}.pt")
    save_file({k: v.contiguous() for k, v in sds[0].items()}, str(tmp_path / "epoch_4.safetensors"))
    urls = [str(tmp_path / f"epoch_{i}.pt") for i in range(4)] + [str(tmp_path / "epoch_4.safetensors")]
    opened: list[str] = []
    real_resolve = ck.resolve

    def counting_resolve(url, storage=None):
        fs, path = real_resolve(url, storage)
        real_open = fs.open

        def open_(p, mode="rb", **kw):
            opened.append(p)
            return real_open(p, mode, **kw)

        fs.open = open_
        return fs, path

    monkeypatch.setattr(ck, "resolve", counting_resolve)
    alive: list[weakref.ref] = []
    seen: list[str] = []

    def check(url, sd):
        gc.collect()
        assert all(r() is None for r in alive), f"an earlier state_dict is still alive while {url} is checked"
        alive.append(weakref.ref(next(iter(sd.values()))))
        seen.append(url)

    infos = ck.inspect_checkpoints(MLP, urls, check=check)
    assert sorted(opened) == sorted(str(tmp_path / os.path.basename(u)) for u in urls)  # each file once
    assert seen == urls
    for u, info in zip(urls, infos):
        data = Path(u).read_bytes()
        assert (info.url, info.size, info.sha256) == (u, len(data), hashlib.sha256(data).hexdigest())
    assert [i.as_dict() for i in infos] == [i.as_dict() for i in ck.hash_checkpoints(urls)]

    # a later checkpoint of another shape fails naming it, before anything is scored
    torch.manual_seed(0)
    torch.save(build_model({**MLP, "hidden": [9, 4]}).state_dict(), tmp_path / "epoch_5.pt")
    with pytest.raises(CheckpointError, match=r"epoch_5\.pt.*shape"):
        ck.inspect_checkpoints(MLP, urls + [str(tmp_path / "epoch_5.pt")])
    torch.save({"net.0.weight": torch.zeros(5, 6)}, tmp_path / "epoch_6.pt")
    with pytest.raises(CheckpointError, match=r"epoch_6\.pt.*missing keys"):
        ck.inspect_checkpoints(MLP, urls[:1] + [str(tmp_path / "epoch_6.pt")])


def test_planning_skips_checkpoints_known_unchanged(tmp_path, monkeypatch):
    """Checkpoints an earlier audit checked (an incremental state's) are not read again while their
    stored size and version tag (here: mtime and inode) are unchanged; a rewritten one is."""
    import hashlib

    import vog_ray.models.checkpoints as ck

    urls = []
    for i in range(3):
        torch.save(mlp_sd(i), tmp_path / f"epoch_{i}.pt")
        urls.append(str(tmp_path / f"epoch_{i}.pt"))
    first = ck.inspect_checkpoints(MLP, urls)
    assert all(i.version for i in first)
    reads: list[str] = []
    real_resolve = ck.resolve

    def counting_resolve(url, storage=None):
        fs, path = real_resolve(url, storage)
        real_open = fs.open
        fs.open = lambda p, mode="rb", **kw: (reads.append(url), real_open(p, mode, **kw))[1]
        return fs, path

    monkeypatch.setattr(ck, "resolve", counting_resolve)
    known = {i.url: i for i in first[:2]}
    again = ck.inspect_checkpoints(MLP, urls, known=known)
    assert reads == [urls[2]] and again == first                     # only the one not known is read
    assert ck.hash_checkpoints(urls[:2], known=known) == first[:2] and reads == [urls[2]]
    torch.save(mlp_sd(7), tmp_path / "epoch_1.pt.new")                 # epoch_1 rewritten (a new inode)
    os.replace(tmp_path / "epoch_1.pt.new", tmp_path / "epoch_1.pt")
    reads.clear()
    changed = ck.inspect_checkpoints(MLP, urls[:2], known=known)
    assert reads == [urls[1]]
    assert changed[1].sha256 == hashlib.sha256((tmp_path / "epoch_1.pt").read_bytes()).hexdigest() != first[1].sha256
