"""Every execution mode gives the same audit (DESIGN.md §2): single-process ``vog_ray.score``, the
fused Ray audit, the checkpoint-sharded one and the incremental one, all on the shared digits audit
of ``tests/modes.py`` (the same data, checkpoints and config).

Each mode is compared with every mode before it in ``MODES`` — raw VoG of every key within 1e-6
relative, z within 1e-6 of its scale, the same ranks (near-ties aside), the same class tables,
the same per-checkpoint signals — and what each mode records about itself is checked. The audits
are memoised for the session: test_audit and test_incremental use the same runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.digits import K
from tests.modes import KEYS, MODES, PRIMARY, RESOLVED_WINDOWS, assert_modes_agree, col

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]  # a hang fails


@pytest.mark.parametrize("mode", MODES[1:])
def test_mode_agrees_with_every_mode_before_it(digits_audit, mode):
    got = digits_audit.mode(mode)
    for other in MODES[:MODES.index(mode)]:
        assert_modes_agree(digits_audit.mode(other), got, f"{mode} vs {other}")


MANIFEST = {
    "fused": {"mode": "fused"},
    "sharded": {"mode": "checkpoint-sharded", "checkpoint_groups": [[0, 1], [2, 3]]},
    "incremental": {"mode": "incremental", "generation": 2},
}


@pytest.mark.parametrize("mode", MODES[1:])
def test_each_published_mode_says_what_it_ran(digits_audit, mode):
    s = digits_audit.mode(mode)
    m = s.manifest
    assert {k: m[k] for k in MANIFEST[mode]} == MANIFEST[mode]
    assert m["num_checkpoints"] == K and m["windows"] == RESOLVED_WINDOWS
    assert m["keys"] == KEYS and m["primary"] == PRIMARY and m["label_mode"] == "true"
    for t in s.tables.values():
        assert t["score"].equals(t[f"z_{PRIMARY}"])
    if mode == "sharded":  # one read block of batch 100: results independent of them too
        assert {k: m["config"]["compute"][k] for k in ("read_blocks", "batch_size")} == {"read_blocks": 1,
                                                                                          "batch_size": 100}


def test_the_shared_audit_means_something(digits_audit):
    """The model learnt something (VoG of random weights would be a weak test), every VoG is
    positive, and class normalisation is per split (two different sets of class moments)."""
    err = digits_audit.train_error
    assert len(err) == K and err[-1] < err[0] and err[-1] < 0.5
    ref = digits_audit.reference()
    for t in ref.tables.values():
        for k in KEYS:
            v = col(t, f"vog_{k}")
            assert np.all(np.isfinite(v)) and np.all(v > 0), k
    assert not np.allclose(col(ref.classes["train"], "mean_late_logit"), col(ref.classes["test"], "mean_late_logit"))
