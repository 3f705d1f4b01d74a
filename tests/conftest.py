"""Fixtures shared by the whole suite: reference data, checkpoint writing, the session's S3 server
(a fresh bucket per test or module), the digits checkpoints (trained once), and the one local Ray
that the integration tests share. Helpers live in ``tests/digits.py``, ``tests/rayenv.py`` and
``tests/s3.py``; the execution-mode tester in ``tests/modes.py``.

Ordering: a module that needs a Ray of its own (``pytestmark = pytest.mark.own_ray``: it kills
Ray processes, or its workers need another env) runs after every other module, so that the shared
Ray starts once per session instead of once after each such module. ``make test`` runs the suite
in 2 processes (pytest-xdist): each is a session of its own (its own S3 server and shared Ray),
and the modules that share a costly session fixture run in the same one (``_GROUPS``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones the repo beside shared/ (the design notes and reference data live there)
SHARED_DIR = REPO_ROOT.parent / "shared"
REFERENCE_DIR = SHARED_DIR / "reference"


def pytest_configure(config):
    config.addinivalue_line("markers", "own_ray: the module starts a Ray of its own (runs after the others)")


# pytest-xdist (``make test`` runs the suite in 2 processes): each module runs whole in one
# process; modules that share a costly session fixture share a process, so it is built once: the
# memoised digits audits (``tests/modes.py``), the published report run, the explorer's run; and
# the two tests that start 2-node clusters share one, so that they never run at the same time (two
# clusters at once on CI's 2 cores miss their start-up timeouts). The groups are xdist's scopes
# (``GroupScheduling``): ``--dist loadgroup``'s ``xdist_group`` marks are lost under pytest 9.2
# (xdist 3.8 renames ``item._nodeid``, which pytest 9 no longer reads), and the tests were then
# dealt out one by one, every session fixture built in both processes.
_GROUPS = {
    "digits": ("distributed/test_modes.py", "distributed/test_audit.py", "distributed/test_incremental.py"),
    "clusters": ("distributed/test_multinode.py", "test_readme.py"),
    "report-run": ("report/test_html.py", "test_security.py"),
    "explore-run": ("explore/", "distributed/test_flags_published.py"),
}
_FIRST = ("digits", "clusters")  # the longest groups start first: the others fill in around them


def group_of(nodeid: str) -> str:
    """The xdist scope of a test: its group, else its module."""
    rel = nodeid.split("::", 1)[0].removeprefix("tests/")
    for name, prefixes in _GROUPS.items():
        if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes):
            return name
    return rel


@pytest.hookimpl(tryfirst=True)  # before xdist's own (it answers for every --dist mode)
def pytest_xdist_make_scheduler(config, log):
    """Whole groups (``group_of``) to one process each, in collection order (see below)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems made
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest groups first, the own-Ray modules last (stable otherwise)."""
    def key(item) -> tuple[int, int]:
        g = group_of(item.nodeid)
        return (item.get_closest_marker("own_ray") is not None, _FIRST.index(g) if g in _FIRST else len(_FIRST))

    items[:] = sorted(items, key=key)


@pytest.fixture
def reference_dir() -> Path:
    """``shared/reference`` beside the clone; a missing directory fails (never skips)."""
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference data directory missing: {REFERENCE_DIR} "
                    "(the repo must be cloned beside shared/)")
    return REFERENCE_DIR


@pytest.fixture
def save_checkpoints(tmp_path):
    """``save(state_dicts, name="ckpt", subdir="ckpts") -> glob`` writing ``<name>_<i>.pt``."""

    def save(state_dicts, name: str = "ckpt", subdir: str = "ckpts") -> str:
        d = tmp_path / subdir
        d.mkdir(parents=True, exist_ok=True)
        for i, sd in enumerate(state_dicts):
            torch.save({k: v.detach().clone() for k, v in sd.items()}, d / f"{name}_{i}.pt")
        return str(d / f"{name}_*.pt")

    return save


# ---- S3 on loopback (moto's server; see tests/s3.py) ----------------------------------------


@pytest.fixture(scope="session")
def s3_session():
    """One real S3 endpoint on 127.0.0.1 for the session (its dummy credentials and endpoint stay
    in this process's env until the session ends; the shared Ray's workers get them too)."""
    from tests.s3 import s3_endpoint

    with s3_endpoint() as srv:
        yield srv


@pytest.fixture
def s3_server(s3_session):
    """A fresh bucket on the session's S3 endpoint: ``.endpoint .bucket .storage .url(path)``."""
    return s3_session.with_bucket()


@pytest.fixture(scope="module")
def s3_server_module(s3_session):
    """Like ``s3_server``, shared by the tests of one module (write test data once)."""
    return s3_session.with_bucket()


# ---- the digits and checkpoints of a tiny CNN (tests/digits.py) -------------------------------


@pytest.fixture(scope="session")
def digits_checkpoints(tmp_path_factory):
    """K = 4 checkpoints of ``tests.digits.MODEL`` trained on the first 600 digits (local files)."""
    from tests.digits import train_checkpoints

    return train_checkpoints(str(tmp_path_factory.mktemp("digits-ckpts")))


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory, digits_checkpoints):
    """The digits and 3 of the shared checkpoints in a directory of their own (``TinyDigits``)."""
    from tests.digits import TinyDigits

    return TinyDigits(tmp_path_factory.mktemp("tiny-digits"), digits_checkpoints)


@pytest.fixture(scope="session")
def digits_report(tmp_path_factory):
    """``(run_url, report)``: a digits run published without Ray (``runfactory.digits_run``: 20%
    shuffled labels flagged ``is_noisy``, softmax target, 30 epochs) whose class 9 is named
    ``runfactory.SCRIPT_CLASS``, and its report (grids of classes 3 and 9). The HTML and the
    security tests read it."""
    import sys

    import runfactory as rf
    from vog_ray.report import build_report

    with pytest.MonkeyPatch.context() as mp:
        try:  # the real image reader when there is one; else the test stand-in
            from vog_ray.data.fetch import fetch_images  # noqa: F401
        except ImportError:
            mp.setitem(sys.modules, "vog_ray.data.fetch", rf.fake_readers())
        names = [f"digit {i}" for i in range(9)] + [rf.SCRIPT_CLASS]
        url = rf.digits_run(str(tmp_path_factory.mktemp("digits-report")), targets=("softmax",), epochs=30,
                            report={"flag_columns": ["is_noisy"], "classes_to_show": [3, 9], "bootstrap": 100},
                            class_names=names)
        return url, build_report(url)


# ---- the local Ray that integration tests share (tests/rayenv.py) ----------------------------


@pytest.fixture(scope="session")
def ray_session(s3_session):
    """The session's ``SharedRay`` (not started yet): 2 CPUs, workers with the session S3 env and
    ``VOG_RAY_TORCH_THREADS=1``. Session-scoped fixtures call ``.ensure()`` before they use it."""
    from tests.rayenv import SharedRay

    shared = SharedRay(s3_session.env)
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def shared_ray(ray_session):
    """The shared local Ray, started (or started again after a module that had its own)."""
    return ray_session.ensure()


# ---- a small real run for the explorer (tests/explore; see tests/explorerun.py) ------------


@pytest.fixture(scope="session")
def explore_run(tiny_digits, ray_session, tmp_path_factory):
    """A Ray audit (on the shared Ray) of the tiny digits with hostile strings, flags and a rejected row."""
    from tests.explorerun import build

    ray_session.ensure()
    return build(tiny_digits, tmp_path_factory.mktemp("explore-run"))
