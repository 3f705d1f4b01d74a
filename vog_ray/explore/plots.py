"""Small inline SVG plots for the example page: one value per checkpoint (loss, probability of the
target, margin), the checkpoints of the heat map's window shaded. Drawn from numbers only; the
one text, the title, is escaped."""

from __future__ import annotations

import math
from typing import Sequence

from markupsafe import Markup, escape

__all__ = ["sparkline"]

WIDTH, HEIGHT, PAD = 280, 84, 6


def _fmt(v: float) -> str:
    return f"{v:.3g}" if math.isfinite(v) else "n/a"


def sparkline(title: str, values: Sequence[float | None], *, shaded: Sequence[int] = ()) -> Markup:
    """An SVG line of ``values`` (one per checkpoint, left to right) with its min and max, and a
    band behind the checkpoints ``shaded`` (0-based)."""
    vals = [float(v) if v is not None else math.nan for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    n = len(vals)
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    plot_h = HEIGHT - 2 * PAD - 14

    def x(i: int) -> float:
        return PAD + (WIDTH - 2 * PAD) * (i / (n - 1) if n > 1 else 0.5)

    def y(v: float) -> float:
        return PAD + 14 + plot_h * (1 - (v - lo) / span)

    step = (WIDTH - 2 * PAD) / max(n - 1, 1)
    bands = "".join(f'<rect x="{x(i) - step / 2:.1f}" y="{PAD + 14}" width="{step:.1f}" height="{plot_h}" '
                    f'class="band"/>' for i in shaded if 0 <= i < n)
    pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(vals) if math.isfinite(v))
    dots = "".join(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="2"/>' for i, v in enumerate(vals) if math.isfinite(v))
    last = _fmt(vals[-1]) if vals else "n/a"
    label = escape(title)
    return Markup(
        f'<svg class="spark" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{label}"><title>{label}</title>{bands}'
        f'<text x="{PAD}" y="{PAD + 9}">{label}: last {last} (min {_fmt(lo)}, max {_fmt(hi)})</text>'
        f'<polyline points="{pts}"/>{dots}</svg>')
