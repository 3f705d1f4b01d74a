"""The explorer over HTTP (a real uvicorn server on 127.0.0.1, plain urllib): what it serves, and
what it refuses. A request naming any path other than the run's examples (``../``, absolute paths,
another bucket, an unknown split) is refused, and an id in a crafted run that names a file outside
its split's data is refused before that file is read. Every page carries a CSP that allows no
script; a foreign Host header is rejected (DNS rebinding); the server binds 127.0.0.1 by default."""

from __future__ import annotations

import csv
import io
import json
import urllib.error
import urllib.request
from urllib.parse import urlencode

import numpy as np
import pytest

from tests.explorerun import BAD_ID, CLASS_NAMES, EVIL_CLASS, EVIL_COLUMN, EVIL_ID
from vog_ray.explore.server import ExplorerServer
from vog_ray.runs import open_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(explore_run):
    with ExplorerServer(explore_run.url) as srv:
        yield srv


def get(srv, path: str, params: dict | None = None, headers: dict | None = None) -> tuple[int, bytes, dict]:
    url = srv.url + path + ("?" + urlencode(params) if params else "")
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_binds_loopback_by_default(server):
    assert server.host == "127.0.0.1"
    from vog_ray.cli import _parser

    assert _parser().parse_args(["explore", "run"]).host == "127.0.0.1"


def test_pages_and_headers(server):
    for path, params in (("/", None), ("/", {"view": "table", "split": "train"}), ("/classes", {"split": "train"}),
                         ("/rejected", None), ("/example", {"split": "test", "id": "part-0.parquet:3"})):
        status, body, headers = get(server, path, params)
        assert status == 200, (path, body[:300])
        assert "script-src" not in headers["content-security-policy"]   # default-src 'none': no script
        assert "default-src 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert b"<script" not in body.replace(b"&lt;script", b"")


@pytest.mark.parametrize("path, params", [
    ("/image", {"split": "train", "id": "../../etc/passwd"}),
    ("/image", {"split": "test", "id": "../../../etc/passwd:0"}),
    ("/image", {"split": "test", "id": "/etc/passwd:0"}),
    ("/image", {"split": "test", "id": "s3://another-bucket/x.parquet:0"}),
    ("/image", {"split": "../test", "id": "part-0.parquet:0"}),
    ("/image", {"split": "/etc", "id": "passwd"}),
    ("/heatmap", {"split": "test", "id": "../part-0.parquet:0"}),
    ("/example", {"split": "train", "id": "/etc/passwd"}),
    ("/example", {"split": "nosuch", "id": "d-0001"}),
    ("/image", {"split": "train", "id": ""}),
])
def test_paths_are_refused(server, path, params):
    status, body, _ = get(server, path, params)
    assert status == 404, (status, body[:200])
    assert b"root:" not in body


@pytest.mark.parametrize("raw", ["/../../etc/passwd", "/style.css/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd",
                                 "/static/..%2f..%2fetc%2fpasswd", "/etc/passwd"])
def test_no_route_serves_files(server, raw):
    try:
        with urllib.request.urlopen(server.url + raw, timeout=60) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    assert status == 404 and b"root:" not in body


def test_foreign_host_header_is_rejected(server):
    status, _, _ = get(server, "/", headers={"Host": "evil.example:80"})
    assert status == 400


@pytest.mark.parametrize("params, needle", [
    ({"label": "abc"}, "label"), ({"split": "nope"}, "split"), ({"sort": "id; DROP TABLE scores"}, "sort"),
    ({"keep.is_noisy": "maybe"}, "keep.is_noisy"), ({"keep.nope": "1"}, "keep.nope"), ({"pct_min": "nan"}, "pct_min"),
    ({"per_page": "100000"}, "per_page"),
])
def test_bad_parameters_are_named(server, params, needle):
    status, body, _ = get(server, "/", params)
    assert status == 400 and needle.encode() in body


def test_images_and_heatmaps(server, explore_run):
    from PIL import Image

    status, png, headers = get(server, "/image", {"split": "train", "id": EVIL_ID})
    assert status == 200 and headers["content-type"] == "image/png"
    a = np.asarray(Image.open(io.BytesIO(png)))
    want = explore_run.images["train"][EVIL_ID]
    assert a.shape[0] % 8 == 0 and np.array_equal(a[:: a.shape[0] // 8, :: a.shape[1] // 8], want)
    status, png, _ = get(server, "/heatmap", {"split": "test", "id": "part-1.parquet:7"})
    assert status == 200 and Image.open(io.BytesIO(png)).size[0] >= 224
    # a rejected row: its page says why, its image is a placeholder (it does not decode)
    status, body, _ = get(server, "/example", {"split": "train", "id": BAD_ID})
    assert status == 200 and b"decode_error" in body
    assert get(server, "/image", {"split": "train", "id": BAD_ID})[0] == 200


def test_export_links(server, explore_run):
    status, body, headers = get(server, "/export", {"format": "csv", "split": "train", "keep.is_noisy": "true"})
    assert status == 200 and headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    t = open_run(explore_run.url).scores().to_pandas()
    want = t[(t.split == "train") & t.is_noisy].sort_values("score", ascending=False)
    assert [r["id"] for r in rows] == want.id.tolist()
    assert {"id", "split", "label", "pred", "z", "percentile", "rank", "flagged", "label_name"} <= set(rows[0])
    status, body, _ = get(server, "/export", {"format": "labelstudio", "split": "test", "flagged": "yes"})
    tasks = json.loads(body)
    assert len(tasks) == int((t[t.split == "test"].flagged).sum()) > 0
    assert all(tk["data"]["image"].startswith("data:image/png;base64,") for tk in tasks)
    lab = tasks[0]["data"]["label"]
    assert tasks[0]["predictions"][0]["result"][0]["value"]["choices"] == [CLASS_NAMES[lab]]
    assert get(server, "/export", {"format": "../../etc/passwd"})[0] == 400


def test_strings_are_escaped(server):
    status, body, _ = get(server, "/", {"split": "train", "view": "table", "per_page": 200})
    page = body.decode()
    assert EVIL_CLASS not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert EVIL_ID not in page and "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    assert EVIL_COLUMN not in page and "&lt;b&gt;grp&lt;/b&gt;" in page
    assert "<i>tilted</i>" not in page and "&lt;i&gt;tilted&lt;/i&gt;" in page


def test_crafted_ids_outside_the_data_are_refused(tmp_path):
    """A run whose score table holds ids naming files outside its split (written by hand, as an
    attacker would): the image is refused (403) and the outside file is never read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import runfactory as rf
    from tests.explorerun import png

    secret = tmp_path / "secret"
    secret.mkdir()
    pq.write_table(pa.table({"image": [png(np.full((8, 8), 255, np.uint8))], "label": [0]}),
                   secret / "part-0.parquet")
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"image": [png(np.zeros((8, 8), np.uint8))] * 4, "label": [0, 1, 0, 1]}),
                   data / "part-0.parquet")
    bad = ["../secret/part-0.parquet:0", f"{secret}/part-0.parquet:0", "part-0.parquet/../../secret/part-0.parquet:0"]
    rows = {"test": {"label": [0, 1, 0, 1, 0, 1, 0], "vog_late_logit": np.arange(7.0),
                     "id": ["part-0.parquet:0", "part-0.parquet:1", "part-0.parquet:2", "part-0.parquet:3", *bad]}}
    url = rf.synthetic_run(str(tmp_path / "run"), rows, split_specs={"test": {"format": "parquet", "url": str(data)}})
    with ExplorerServer(url) as srv:
        assert get(srv, "/image", {"split": "test", "id": "part-0.parquet:2"})[0] == 200
        for i in bad:
            for path in ("/image", "/heatmap", "/example"):
                status, body, _ = get(srv, path, {"split": "test", "id": i})
                assert status == 403 and b"outside" in body, (path, i)
        # the results page lists them (they are rows); the background fetch of the page's images
        # refuses them: nothing is read for them (cached as "no image"), the others are read
        status, body, _ = get(srv, "/", {"split": "test"})
        assert status == 200
        for i in bad + ["part-0.parquet:1"]:
            srv.explorer.images.get("test", i)
        cache = srv.explorer.images.cache.d
        assert all(cache[("test", i)] is None for i in bad)
        assert cache[("test", "part-0.parquet:1")] is not None
