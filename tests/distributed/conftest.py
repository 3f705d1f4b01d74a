"""The shared audit of ``tests/modes.py`` for the distributed tests: one bucket on the session's S3
endpoint, the digits and the K = 4 checkpoints written there once, every audit memoised."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_audit(s3_session, digits_checkpoints, ray_session):
    """``tests.modes.DigitsAudit``: ``.config(name)``, ``.audit(name)``, ``.reference()``,
    ``.incremental()``, ``.mode(mode)``; the measured maxima are printed at the end (``pytest -s``)."""
    from tests.modes import FIGURES, DigitsAudit

    yield DigitsAudit(s3_session.with_bucket(), digits_checkpoints, ray_session)
    if FIGURES:
        print("\n[tests/modes.py] measured maxima:\n" + "\n".join(
            f"  {k}: {v:.3g}" for k, v in sorted(FIGURES.items())))
