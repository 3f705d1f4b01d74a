"""Report figures, drawn with matplotlib's Agg canvas (no pyplot, no global state, no display).

Every function returns PNG bytes. Text from the data (ids, class names) is drawn with
``parse_math=False`` so a ``$`` in a name never reaches mathtext.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["error_by_decile", "error_by_percentile", "histogram_counts", "vog_histograms", "data_map", "image_grid",
           "tile_png", "heatmap_rgb", "heatmap_png", "HEATMAP_CMAP", "flip"]

DPI = 90


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _rate_err(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    rate = np.array([r["error_rate"] if r["error_rate"] is not None else np.nan for r in rows])
    lo = np.array([r["ci_low"] if r["ci_low"] is not None else np.nan for r in rows])
    hi = np.array([r["ci_high"] if r["ci_high"] is not None else np.nan for r in rows])
    err = np.vstack([np.clip(rate - lo, 0, None), np.clip(hi - rate, 0, None)])
    return rate, np.nan_to_num(err)


def error_by_decile(title: str, per_window: dict[str, list[dict[str, Any]]],
                    overall: float | None) -> bytes:
    """Grouped bars: error rate per z-VoG decile, one bar per window, 95% bootstrap whiskers."""
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    W = max(1, len(per_window))
    width = 0.8 / W
    x = np.arange(1, 11)
    for i, (w, rows) in enumerate(per_window.items()):
        rate, err = _rate_err(rows)
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(rate), width, yerr=err, capsize=2,
               label=w, error_kw={"elinewidth": 0.8})
    if overall is not None:
        ax.axhline(overall, color="k", ls="--", lw=0.8, label=f"split overall ({overall:.3f})")
    ax.set_xticks(x)
    ax.set_xlabel("z-VoG decile (10 = highest VoG)")
    ax.set_ylabel("error rate (last checkpoint)")
    ax.set_title(title, parse_math=False, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.15)
    return _png(fig)


def error_by_percentile(title: str, per_window: dict[str, list[dict[str, Any]]]) -> bytes:
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(1, 101)
    for w, rows in per_window.items():
        rate, err = _rate_err(rows)
        line, = ax.plot(x, rate, lw=0.8, marker="o", ms=2, label=w)
        ax.fill_between(x, rate - err[0], rate + err[1], color=line.get_color(), alpha=0.08, lw=0)
    ax.set_xlabel("z-VoG percentile bin (100 = highest VoG)")
    ax.set_ylabel("error rate")
    ax.set_title(title, parse_math=False, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.15)
    return _png(fig)


def histogram_counts(vog: np.ndarray, cls: np.ndarray, classes: Sequence[int],
                     bins: int = 30) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Common bin edges over the split (min … 99.5th percentile; larger values are counted in
    the last bin) and the raw-VoG counts of each class."""
    v = np.asarray(vog, np.float64)
    ok = np.isfinite(v)
    hi = float(np.quantile(v[ok], 0.995)) if ok.any() else 1.0
    lo = float(v[ok].min()) if ok.any() else 0.0
    if not hi > lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = {int(c): np.histogram(np.clip(v[ok & (cls == c)], lo, hi), bins=edges)[0] for c in classes}
    return edges, counts


def vog_histograms(title: str, edges: np.ndarray, counts: dict[int, np.ndarray],
                   class_label: dict[int, str]) -> bytes:
    """Small multiples: the raw-VoG histogram of each class (see :func:`histogram_counts`)."""
    cols = min(5, max(1, len(counts)))
    rows = max(1, int(np.ceil(len(counts) / cols)))
    fig = Figure(figsize=(2.2 * cols, 1.5 * rows + 0.8))
    axes = fig.subplots(rows, cols, sharex=True, squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.98, top=1 - 0.55 / (1.5 * rows + 0.8), bottom=0.45 / (1.5 * rows + 0.8),
                        hspace=0.45, wspace=0.12)
    items = list(counts.items())
    for i, ax in enumerate(axes.flat):
        if i >= len(items):
            ax.set_axis_off()
            continue
        c, cnt = items[i]
        ax.stairs(cnt, edges, fill=True, color="#4c72b0")
        ax.set_title(f"{class_label.get(int(c), str(c))} (n={int(cnt.sum())})", parse_math=False, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10, parse_math=False)
    return _png(fig)


def data_map(title: str, confidence: np.ndarray, variability: np.ndarray, z: np.ndarray,
             seed: int = 0, max_points: int = 20000) -> bytes:
    """Confidence vs variability (data map), coloured by z-VoG (clipped to ±3)."""
    c, v, zz = (np.asarray(a, np.float64) for a in (confidence, variability, z))
    ok = np.flatnonzero(np.isfinite(c) & np.isfinite(v) & np.isfinite(zz))
    if len(ok) > max_points:
        ok = np.sort(np.random.default_rng(seed).choice(ok, max_points, replace=False))
    fig = Figure(figsize=(5.6, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    sc = ax.scatter(v[ok], c[ok], c=np.clip(zz[ok], -3, 3), s=6, cmap="coolwarm", vmin=-3, vmax=3,
                    linewidths=0)
    fig.colorbar(sc, ax=ax, label="z-VoG (clipped to ±3)")
    ax.set_xlabel("variability (std of p(target) across checkpoints)")
    ax.set_ylabel("confidence (mean p(target))")
    ax.set_title(title, parse_math=False, fontsize=10)
    fig.subplots_adjust(left=0.13, right=0.98, top=0.92, bottom=0.12)
    return _png(fig)


def _plain(text: str) -> str:
    """Legend and tick labels parse mathtext: a ``$`` from a name is escaped."""
    return str(text).replace("$", r"\$")


def _line(ax, x: np.ndarray, values: list, **kw) -> None:
    ax.plot(x, [np.nan if v is None else v for v in values], marker="o", ms=3, lw=1.2, **kw)


def flip(title: str, window_labels: list[str], per_target: dict[str, dict[str, Any]]) -> bytes:
    """The early/late flip: windows in checkpoint order on x; left, mean z-VoG of flagged (solid)
    and unflagged (dashed) rows per flag column; right, error of the top (solid) and bottom
    (dashed) decile. One colour per target (and flag column)."""
    has_flags = any("mean_z_flagged" in d for d in per_target.values())
    has_err = any("top_decile_error" in d for d in per_target.values())
    panels = int(has_flags) + int(has_err)
    fig = Figure(figsize=(5.2 * max(panels, 1), 3.8))
    x = np.arange(len(window_labels))
    colours = iter(["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"])
    colour = {}
    for t, d in per_target.items():
        for col in d.get("mean_z_flagged", {}) or {"": None}:
            colour[(t, col)] = next(colours, "#333333")
    axes = [fig.add_subplot(1, panels or 1, i + 1) for i in range(panels or 1)]
    if has_flags:
        ax = axes[0]
        for t, d in per_target.items():
            for col, vals in (d.get("mean_z_flagged") or {}).items():
                c = colour[(t, col)]
                _line(ax, x, vals, color=c, label=_plain(f"{col}, {t}"))
                _line(ax, x, d["mean_z_rest"][col], color=c, ls="--")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylabel("mean z-VoG (solid: flagged; dashed: rest)")
    if has_err:
        ax = axes[-1]
        for t, d in per_target.items():
            if "top_decile_error" in d:
                c = colour[(t, next(iter(d.get("mean_z_flagged") or {"": None})))]
                _line(ax, x, d["top_decile_error"], color=c, label=_plain(f"{t}: top decile"))
                _line(ax, x, d["bottom_decile_error"], color=c, ls="--", label=_plain(f"{t}: bottom decile"))
        ax.set_ylabel("error rate of the decile (last checkpoint)")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels([_plain(w) for w in window_labels], fontsize=8)
        ax.set_xlabel("window (checkpoint order)")
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10, parse_math=False)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.88, bottom=0.2, wspace=0.28)
    return _png(fig)


def _as_display(img: np.ndarray) -> tuple[np.ndarray, str | None]:
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)   # CHW -> HWC
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = np.nanmin(a), np.nanmax(a)
        a = np.zeros(a.shape, np.uint8) if not hi > lo else ((a - lo) / (hi - lo) * 255).astype(np.uint8)
    return a, ("gray" if a.ndim == 2 else None)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def image_grid(title: str, tiles: list[tuple[np.ndarray | None, str]], cols: int = 5,
               cell: int = 112) -> bytes:
    """A grid of images drawn with Pillow (fast), each with its caption lines below
    (``None`` image: a 'missing' tile). Long captions are cut with an ellipsis; the HTML page
    shows them in full."""
    from PIL import Image, ImageDraw

    rows = max(1, int(np.ceil(len(tiles) / cols)))
    pad, cap_h, head = 8, 40, 30
    W = cols * (cell + pad) + pad
    Hh = head + rows * (cell + cap_h + pad) + pad
    canvas = Image.new("RGB", (W, Hh), "white")
    draw = ImageDraw.Draw(canvas)
    f_title, f_cap = _font(14), _font(11)
    draw.text((pad, 8), _fit(draw, title, f_title, W - 2 * pad), fill="black", font=f_title)
    for i, (img, cap) in enumerate(tiles):
        r, c = divmod(i, cols)
        x0 = pad + c * (cell + pad)
        y0 = head + r * (cell + cap_h + pad)
        if img is None:
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill="#eeeeee")
            draw.text((x0 + 30, y0 + cell // 2 - 6), "missing", fill="#888888", font=f_cap)
        else:
            a, _ = _as_display(img)
            im = Image.fromarray(a).convert("RGB")
            scale = cell / max(a.shape[0], a.shape[1])
            size = (max(1, int(round(a.shape[1] * scale))), max(1, int(round(a.shape[0] * scale))))
            im = im.resize(size, Image.NEAREST if scale >= 1 else Image.BILINEAR)
            canvas.paste(im, (x0 + (cell - size[0]) // 2, y0 + (cell - size[1]) // 2))
        for j, line in enumerate(str(cap).split("\n")[:3]):
            draw.text((x0, y0 + cell + 2 + 12 * j), _fit(draw, line, f_cap, cell), fill="black", font=f_cap)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def tile_png(img: np.ndarray, min_size: int = 64) -> bytes:
    """One tile as PNG (small images are enlarged with nearest-neighbour)."""
    from PIL import Image

    a, _ = _as_display(img)
    im = Image.fromarray(a)
    s = max(1, int(np.ceil(min_size / max(1, min(a.shape[:2])))))
    if s > 1:
        im = im.resize((a.shape[1] * s, a.shape[0] * s), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


HEATMAP_CMAP = "inferno"   # perceptually uniform, dark = stable pixels, bright = unstable ones
HEATMAP_ALPHA = 0.65       # weight of the map over the (grayscale) image


def heatmap_rgb(image: np.ndarray | None, vmap: np.ndarray, *, overlay: bool = True) -> np.ndarray:
    """A VoG heat map as uint8 RGB: the per-pixel std scaled to [0, its maximum] through
    ``HEATMAP_CMAP``, blended over the grayscale image (``overlay``) or alone. An image of
    another size than the map is resized to it."""
    from matplotlib import colormaps
    from PIL import Image

    m = np.nan_to_num(np.asarray(vmap, np.float64))
    top = float(m.max()) if m.size else 0.0
    rgb = colormaps[HEATMAP_CMAP](m / top if top > 0 else m)[..., :3]
    if overlay and image is not None:
        a, _ = _as_display(image)
        gray = np.asarray(Image.fromarray(a).convert("L"))
        if gray.shape != m.shape:
            gray = np.asarray(Image.fromarray(gray).resize((m.shape[1], m.shape[0]), Image.BILINEAR))
        base = np.repeat((gray.astype(np.float64) / 255.0)[..., None], 3, axis=2)
        rgb = (1 - HEATMAP_ALPHA) * base + HEATMAP_ALPHA * rgb
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def heatmap_png(image: np.ndarray | None, vmap: np.ndarray, *, overlay: bool = True, min_size: int = 64) -> bytes:
    """:func:`heatmap_rgb` as a PNG (small maps enlarged with nearest-neighbour)."""
    return tile_png(heatmap_rgb(image, vmap, overlay=overlay), min_size=min_size)
