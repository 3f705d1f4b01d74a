"""Model factories only from trusted code: a factory from the standard library, ``builtins`` or the
libraries vog-ray runs on is refused before its module is imported or anything is called (by
``build_model`` and already when the config is loaded); ``VOG_RAY_ALLOWED_FACTORIES`` narrows
factories to named packages. Each refusal is checked for its side effect (a marker file a
command would create, a module that would be imported), in a fresh interpreter where it matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vog_ray.models.factories import ALLOWED_FACTORIES_ENV, FactoryRefused, check_factory
from vog_ray.models.registry import build_model

REPO = Path(__file__).resolve().parents[2]


def _fresh_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (the repo importable); it prints one JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(ALLOWED_FACTORIES_ENV, None)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", [
    {"name": "subprocess:call", "args": ["sh", "-c", "touch {marker}"]},
    {"name": "os:system", "command": "touch {marker}"},
    {"name": "builtins:eval", "source": "open({marker!r}, 'w').close()"},
    {"name": "torch.hub:load", "repo_or_dir": "someone/repo", "model": "x", "trust_repo": True},
    {"name": "torch:load", "f": "x.pt", "weights_only": False},
])
def test_standard_library_builtins_and_runtime_factories_are_refused_before_any_call(spec, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.delenv(ALLOWED_FACTORIES_ENV, raising=False)
    marker = tmp_path / "pwned"
    spec = {k: (v.format(marker=str(marker)) if isinstance(v, str) else
                [a.format(marker=str(marker)) for a in v] if isinstance(v, list) else v)
            for k, v in spec.items()}
    with pytest.raises(FactoryRefused, match="refused"):
        build_model(spec)
    assert not marker.exists()


def test_the_config_itself_refuses_the_factory_exit_2_naming_model_and_file(tmp_path):
    marker = tmp_path / "pwned"
    cfg = {"data": {"splits": {"train": {"format": "npz", "url": str(tmp_path / "x.npz")}}},
           "model": {"name": "subprocess:call", "args": ["sh", "-c", f"touch {marker}"]},
           "checkpoints": str(tmp_path / "c" / "*.pt"), "output": {"url": str(tmp_path / "out")}}
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != ALLOWED_FACTORIES_ENV}
    for cmd in (["validate", str(path)], ["audit", str(path)]):
        p = subprocess.run([sys.executable, "-m", "vog_ray.cli", *cmd], env=env, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 2, (cmd, p.stdout, p.stderr)
        assert str(path) in p.stderr and "model: model factory 'subprocess:call' is refused" in p.stderr, p.stderr
    assert not marker.exists()


_PROBE = """
import json, os, sys
from vog_ray.models.registry import build_model
from vog_ray.models.factories import FactoryRefused

def attempt(name, allowed):
    if allowed is None:
        os.environ.pop("VOG_RAY_ALLOWED_FACTORIES", None)
    else:
        os.environ["VOG_RAY_ALLOWED_FACTORIES"] = allowed
    try:
        m = build_model(name)
        return {"built": type(m).__name__}
    except FactoryRefused as e:
        return {"refused": str(e)}

out = {}
# antigravity opens a web browser when imported, and nothing else imports it
out["antigravity"] = attempt("antigravity:geohash", None)
out["antigravity_imported"] = "antigravity" in sys.modules
for allowed in ("mypkg", "test", ""):  # not listed; a prefix of the package name; nothing allowed
    out["not_listed:" + allowed] = attempt("tests.helpers_factory:make", allowed)
    out["lenet:" + allowed] = attempt("lenet", allowed)
out["helpers_imported_while_refused"] = "tests.helpers_factory" in sys.modules
out["listed"] = attempt({"name": "tests.helpers_factory:make", "in_features": 3, "width": 5, "num_classes": 2},
                        "otherpkg, tests")
print(json.dumps(out))
"""


def test_refused_modules_are_never_imported_and_allowed_factories_name_their_packages():
    out = _fresh_python(_PROBE)
    assert "standard library" in out["antigravity"]["refused"] and out["antigravity_imported"] is False
    for allowed in ("mypkg", "test", ""):
        assert ALLOWED_FACTORIES_ENV in out["not_listed:" + allowed]["refused"], out
        assert out["lenet:" + allowed] == {"built": "LeNet"}  # built-in models need no factory
    assert out["helpers_imported_while_refused"] is False
    assert out["listed"] == {"built": "Sequential"}


def test_factory_names_must_be_plain_module_and_attribute_names(monkeypatch):
    monkeypatch.delenv(ALLOWED_FACTORIES_ENV, raising=False)
    for name in ("tests.helpers_factory:make.__globals__", ".relative:make", "tests/helpers:make",
                 "tests.helpers_factory:"):
        with pytest.raises(FactoryRefused, match="must look like"):
            check_factory(name)
    assert check_factory("tests.helpers_factory:make") == ("tests.helpers_factory", "make")


def test_the_scheduled_audit_manifests_allow_no_factory_and_their_config_needs_none(monkeypatch):
    from vog_ray.config import load_config

    cron = REPO / "cluster" / "kuberay"
    spec = yaml.safe_load((cron / "raycronjob.yaml").read_text())["spec"]["jobTemplate"]
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"][ALLOWED_FACTORIES_ENV] == ""
    container = yaml.safe_load((cron / "cronjob.yaml").read_text())["spec"]["jobTemplate"]["spec"]["template"][
        "spec"]["containers"][0]
    args = container["command"]
    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    assert runtime_env == {"env_vars": {ALLOWED_FACTORIES_ENV: ""}}
    assert args.index("--runtime-env-json") < args.index("--")
    # the config both submit loads under that setting (a built-in model, no factory)
    monkeypatch.setenv(ALLOWED_FACTORIES_ENV, "")
    assert load_config(REPO / spec["entrypoint"].split()[-1]).model == "resnet18_cifar"
    assert load_config(REPO / args[-1]).model == "resnet18_cifar"
