"""The one label check: which labels can serve as a target index for a model of ``C`` classes.
The decode stage, the scorer actor, the engine and the single-process audit all call it."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MISSING", "label_problems", "out_of_range"]

MISSING = -1  # the label of an unlabelled row


def out_of_range(value: int, num_classes: int) -> str:
    """The rejection reason of a label outside ``[0, num_classes)``."""
    return f"label_out_of_range: {int(value)} not in [0, {int(num_classes)})"


def label_problems(labels: Any, num_classes: int | None = None, *, allow_missing: bool = True) -> np.ndarray:
    """Per label: ``None`` when usable, else the reason (an object array, one per label).

    ``-1`` (:data:`MISSING`) is an unlabelled row: fine with ``allow_missing`` (audits against
    predicted labels), else ``"missing_label"``. Any other negative label, and with
    ``num_classes`` any label ``>= num_classes``, is ``"label_out_of_range: …"``.
    """
    y = np.asarray(labels, np.int64).reshape(-1)
    out = np.full(len(y), None, dtype=object)
    bad = (y < MISSING) if allow_missing else (y < 0)
    if num_classes is not None:
        bad |= y >= num_classes
    for i in np.flatnonzero(bad):
        if y[i] == MISSING:
            out[i] = "missing_label"
        elif num_classes is None:
            out[i] = f"label_out_of_range: {int(y[i])} is negative"
        else:
            out[i] = out_of_range(y[i], num_classes)
    return out
