"""The explorer's web app (Starlette, Jinja2 templates with autoescape, no script on any page):
the results page (grid or table, filters, sort, paging, export links), the example page (image,
labels, every key's z and percentile, per-checkpoint signals, the VoG heat map), the per-class
summary and the rejected rows, over one published run.

Every request names examples by split and id; an example is served only when it is a row of the
run (checked in DuckDB, or known from a page the server rendered), and a file-naming id only
inside its split's data (:mod:`.guard`). Responses carry a Content-Security-Policy that allows
no script and no other origin; the Host header must name this machine when bound to loopback.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ..config import SplitSpec, StorageSpec
from ..runs import open_run
from ..storage import StorageOptions
from . import pages
from .export import FORMATS, MEDIA_TYPES, export_table, write_export
from .guard import Refused, check_source, id_file, split_base
from .heatmap import HeatMapError, MapMaker
from .images import HeatMaps, ImageCache, placeholder_png
from .params import BadRequest, parse_view
from .queries import RunTables

__all__ = ["Explorer", "create_app", "LOOPBACK"]

log = logging.getLogger("vog_ray.explore")

LOOPBACK = ("127.0.0.1", "localhost", "::1")
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
SIZES = {"thumb": 96, "large": 224}
KNOWN_ROWS = 100_000   # (split, id) pairs remembered from rendered pages (served without a lookup)


class Explorer:
    """The state behind the pages: the run, its DuckDB views, the image and heat-map caches."""

    def __init__(self, run: str, *, storage: StorageOptions | None = None,
                 data_storage: StorageOptions | None = None, device: str = "cpu"):
        self.run = open_run(run, storage)
        self.tables = RunTables(self.run)
        self.config = self.run.manifest.get("config") or {}
        data = self.config.get("data") or {}
        self.splits_cfg = data.get("splits") or {}
        self.class_names: list[str] | None = data.get("class_names")
        self.num_classes = self._num_classes()
        self.data_storage = data_storage or (storage if storage is not None else
                                             StorageSpec.model_validate(self.config.get("storage") or {}).options())
        self.images = ImageCache(self._load_images)
        self.heatmaps = HeatMaps(lambda key: MapMaker(self.run, key, data_storage=self.data_storage, device=device))
        self.known: dict[tuple[str, str], int | None] = {}
        self.bases: dict[str, str] = {}
        self.known_lock = threading.Lock()

    def _num_classes(self) -> int:
        return len(self.class_names) if self.class_names else self.tables.num_classes()

    def class_label(self, c: Any) -> str:
        if c is None or int(c) < 0:
            return "?"
        c = int(c)
        name = self.class_names[c] if self.class_names and c < len(self.class_names) else str(c)
        return str(c) if name == str(c) else f"{c}: {name}"

    def spec(self, split: str) -> SplitSpec:
        return SplitSpec.model_validate(self.splits_cfg[split])

    def check_source(self, split: str, example_id: str) -> None:
        """:func:`.guard.check_source` with the split's base directory resolved once."""
        spec = self.spec(split)
        if id_file(spec, example_id) is None:
            return
        with self.known_lock:
            base = self.bases.get(split)
        if base is None:
            base = split_base(spec, self.data_storage)
            with self.known_lock:
                self.bases[split] = base
        check_source(spec, example_id, self.data_storage, base=base)

    def _load_images(self, split: str, ids: list[str]) -> dict[str, Any]:
        from ..data.fetch import fetch_images

        allowed = []
        for i in ids:
            try:
                self.check_source(split, i)
                allowed.append(i)
            except Refused as e:
                log.warning("%s", e)
        return fetch_images(self.spec(split), allowed, self.data_storage, on_error="skip")

    def remember(self, rows: list[dict[str, Any]]) -> None:
        """Rows a page showed (read from the run): their images may be served without a lookup."""
        with self.known_lock:
            if len(self.known) > KNOWN_ROWS:
                self.known.clear()
            for r in rows:
                self.known[(r["split"], r["id"])] = r.get("rank")

    def example(self, split: str, example_id: str) -> dict[str, Any] | None:
        """The score row of an example (its rank from a rendered page, if any, finds it fast)."""
        with self.known_lock:
            rank = self.known.get((split, example_id))
        return self.tables.example(split, example_id, rank)

    def is_row(self, split: str, example_id: str) -> bool:
        with self.known_lock:
            if (split, example_id) in self.known:
                return True
        return split in self.splits_cfg and self.tables.has_example(split, example_id)

    def warm(self) -> None:
        """Before the first request: compile the templates, import the image readers, and load the
        ranked key's checkpoints in the background (the first example page then finds them)."""
        from ..data import fetch  # noqa: F401 - imported for its side effect: the first page is not slower
        from ..report import figures  # noqa: F401

        pages.compile_templates()

        def load() -> None:
            try:
                self.heatmaps.maker(self.tables.primary)
            except Exception as e:  # noqa: BLE001 - the example page reports it when asked
                log.info("heat maps of %s not ready: %s", self.tables.primary, e)

        self._warming = threading.Thread(target=load, name="vog-explore-warm", daemon=True)
        self._warming.start()

    def wait_warm(self, timeout: float | None = None) -> None:
        """Wait for :meth:`warm`'s background loading (benchmarks time the server after it)."""
        if getattr(self, "_warming", None) is not None:
            self._warming.join(timeout)

    def close(self) -> None:
        self.images.close()
        self.tables.close()


def _split_id(request: Request, ex: Explorer) -> tuple[str, str]:
    """The ``split`` and ``id`` parameters, which must name a row of the run (else 404)."""
    split, eid = request.query_params.get("split", ""), request.query_params.get("id", "")
    if split not in ex.splits_cfg or not ex.is_row(split, eid):
        raise LookupError(f"no example {eid!r} in split {split!r} of this run")
    return split, eid


def _html(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> Response:
    return pages.render(request, name, {"ex": request.app.state.explorer, **ctx}, status)


def _page(fn):
    """A route: ``fn(request, explorer)``; bad input is a 400 page, an unknown example 404, a
    path outside the data 403 (each names the problem)."""
    def endpoint(request: Request) -> Response:
        try:
            return fn(request, request.app.state.explorer)
        except BadRequest as e:
            return _html(request, "error.html", {"title": "Bad request", "message": str(e)}, 400)
        except LookupError as e:
            return _html(request, "error.html", {"title": "Not found", "message": str(e)}, 404)
        except Refused as e:
            return _html(request, "error.html", {"title": "Refused", "message": str(e)}, 403)
    return endpoint


def results(request: Request, ex: Explorer) -> Response:
    view = parse_view(request.query_params, ex.tables, ex.num_classes)
    page = ex.tables.page(view.filters, sort=view.sort, descending=view.descending, page=view.page,
                          per_page=view.per_page)
    ex.remember(page.rows)
    for s in {r["split"] for r in page.rows}:
        ex.images.prefetch(s, [r["id"] for r in page.rows if r["split"] == s])
    return _html(request, "results.html", {"view": view, "page": page})


def example(request: Request, ex: Explorer) -> Response:
    split, eid = _split_id(request, ex)
    ex.check_source(split, eid)   # the page reads the example's source (its heat map)
    return _html(request, "example.html", pages.example_context(ex, request, split, eid))


def classes(request: Request, ex: Explorer) -> Response:
    split = request.query_params.get("split", "") or ex.tables.splits[0]
    if split not in ex.tables.splits:
        raise BadRequest(f"split: {split!r} is not a split of this run ({ex.tables.splits})")
    return _html(request, "classes.html", {"split": split, "rows": ex.tables.classes(split)})


def rejected(request: Request, ex: Explorer) -> Response:
    split = request.query_params.get("split", "") or None
    if split is not None and split not in ex.splits_cfg:
        raise BadRequest(f"split: {split!r} is not a split of this run")
    try:
        page_no = max(1, int(request.query_params.get("page", "1") or 1))
    except ValueError:
        raise BadRequest("page: not an integer") from None
    page = ex.tables.rejected(split, page=page_no)
    ex.remember(page.rows)
    return _html(request, "rejected.html", {"split": split, "page": page})


def _png(png: bytes) -> Response:
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def image(request: Request, ex: Explorer) -> Response:
    from ..report.figures import tile_png

    split, eid = _split_id(request, ex)
    ex.check_source(split, eid)
    size = SIZES.get(request.query_params.get("size", "thumb"), SIZES["thumb"])
    img = ex.images.get(split, eid)
    return _png(tile_png(img, min_size=size) if img is not None else placeholder_png(size))


def heatmap(request: Request, ex: Explorer) -> Response:
    split, eid = _split_id(request, ex)
    ex.check_source(split, eid)
    key = request.query_params.get("key", "") or ex.tables.primary
    if key not in ex.tables.keys:
        raise BadRequest(f"key: {key!r} is not one of {ex.tables.keys}")
    row = ex.example(split, eid)
    if row is None:
        raise LookupError(f"example {eid!r} was not scored (rejected rows have no heat map)")
    try:
        png, _ = ex.heatmaps.get(split, row, key, request.query_params.get("mode") != "map", SIZES["large"])
    except (HeatMapError, ValueError, OSError) as e:
        log.warning("heat map of %r: %s", eid, e)
        png = placeholder_png(SIZES["large"])
    return _png(png)


def export(request: Request, ex: Explorer) -> Response:
    fmt = request.query_params.get("format", "csv")
    if fmt not in FORMATS or fmt == "parquet":
        raise BadRequest(f"format: {fmt!r} is not one of csv, jsonl, labelstudio")
    view = parse_view(request.query_params, ex.tables, ex.num_classes)
    buf = io.BytesIO()
    write_export(ex.tables, export_table(ex.tables, view.filters), fmt, buf, ex.data_storage)
    name = f"vog-{ex.run.run_id}.{'json' if fmt == 'labelstudio' else fmt}"
    return Response(buf.getvalue(), media_type=MEDIA_TYPES[fmt],
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


def report(request: Request, ex: Explorer) -> Response:
    from ..storage import resolve

    fs, path = resolve(ex.run.path("report.html"), ex.run.storage)
    if not fs.exists(path):
        raise LookupError("this run has no report.html (vog-ray report RUN writes it)")
    with fs.open(path, "rb") as f:
        # the report is self-contained: inline styles and data: images, no script
        return HTMLResponse(f.read(), headers={"Content-Security-Policy": "default-src 'none'; img-src data:; "
                                               "style-src 'unsafe-inline'"})


def style(request: Request, ex: Explorer) -> Response:
    return Response(pages.stylesheet(), media_type="text/css", headers={"Cache-Control": "max-age=3600"})


ROUTES = {"/": results, "/example": example, "/classes": classes, "/rejected": rejected, "/image": image,
          "/heatmap": heatmap, "/export": export, "/report": report, "/style.css": style}


def create_app(ex: Explorer, *, host: str = "127.0.0.1") -> Starlette:
    """The Starlette app serving ``ex`` (bound to ``host``: loopback accepts only local Host headers)."""
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    hosts = ["127.0.0.1", "localhost", "[::1]"] if host in LOOPBACK else ["*"]
    app = Starlette(routes=[Route(p, _page(fn)) for p, fn in ROUTES.items()],
                    middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts), Middleware(SecurityHeaders)])
    app.state.explorer = ex
    return app


class SecurityHeaders:
    """ASGI middleware: the CSP (unless a route set its own), no MIME sniffing, no referrer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                from starlette.datastructures import MutableHeaders

                h = MutableHeaders(scope=message)
                h.setdefault("Content-Security-Policy", CSP)
                h["X-Content-Type-Options"] = "nosniff"
                h["Referrer-Policy"] = "no-referrer"
            await send(message)

        await self.app(scope, receive, send_with_headers)
