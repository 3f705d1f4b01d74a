"""Resume of the score stage: only a raw part *proven* half-written is deleted.

* ``incomplete_parquet`` on real Parquet files cut at every kind of place (nothing, the header
  only, half, all but the last byte, a footer length that points outside the file) and on the
  complete file;
* ``load_done_keys``: the keys of the complete parts, the incomplete ones listed for deletion; a
  read error (an injected ``TimeoutError``) and a complete-looking part whose footer is garbage
  raise an ``OSError`` naming the part;
* ``scan_partial_raw`` on a real S3 API (moto) behind a fault-injecting proxy, in a Ray task: with
  every read of one part answered ``503 SlowDown`` it fails naming that part and deletes NOTHING
  (not even the truncated part beside it); once the store answers it deletes only the truncated
  part and returns the keys of the others.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from vog_ray.distributed.resume import KEY_SEP, incomplete_parquet, load_done_keys


def _part(first: int, n: int = 300, split: str = "train") -> bytes:
    """A raw part as stage 1 writes it (the columns resume reads, and one more)."""
    t = pa.table({"id": [f"f.parquet:{i}" for i in range(first, first + n)], "split": [split] * n,
                  "vog_all_logit": np.linspace(0, 1, n)})
    buf = io.BytesIO()
    pq.write_table(t, buf, row_group_size=100)
    return buf.getvalue()


def _keys(first: int, n: int = 300, split: str = "train") -> list[bytes]:
    return [f"{split}{KEY_SEP}f.parquet:{i}".encode() for i in range(first, first + n)]


def _footer_length(data: bytes) -> int:
    return int.from_bytes(data[-8:-4], "little")


def test_incomplete_parquet_is_proven_from_size_and_magic(tmp_path):
    fs = LocalFileSystem()
    data = _part(0)
    cuts = {
        "empty": b"",
        "header only": data[:4],
        "half": data[: len(data) // 2],
        "all but the last byte": data[:-1],
        "footer cut at its start": data[: len(data) - 8 - _footer_length(data)],
        # magic intact, but the footer length says more than the file holds
        "footer length too large": data[:-8] + (len(data)).to_bytes(4, "little") + b"PAR1",
    }
    for name, b in cuts.items():
        p = tmp_path / f"{name.replace(' ', '_')}.parquet"
        p.write_bytes(b)
        assert incomplete_parquet(fs, str(p)) is not None, name
    full = tmp_path / "complete.parquet"
    full.write_bytes(data)
    assert incomplete_parquet(fs, str(full)) is None
    assert pq.read_table(str(full)).num_rows == 300   # the reference: pyarrow reads it


class FlakyFS(LocalFileSystem):
    """A local filesystem whose every open of one file times out (a transient store error)."""

    def __init__(self, flaky: str, **kw):
        super().__init__(**kw)
        self.flaky = flaky

    def _open(self, path, mode="rb", **kw):
        if path.endswith(self.flaky):
            raise TimeoutError(f"read timed out: {path}")
        return super()._open(path, mode, **kw)


def test_load_done_keys_deletes_only_proven_incomplete_parts(tmp_path):
    a, b = _part(0), _part(300, split="test")
    (tmp_path / "a.parquet").write_bytes(a)
    (tmp_path / "b.parquet").write_bytes(b)
    (tmp_path / "half.parquet").write_bytes(a[: len(a) // 2])
    files = sorted(str(p) for p in tmp_path.glob("*.parquet"))
    keys, meta = load_done_keys(LocalFileSystem(), files)
    assert meta["bad"] == [str(tmp_path / "half.parquet")]
    assert meta["good"] == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert meta["rows"] == 600
    assert keys.tolist() == sorted(_keys(0) + _keys(300, split="test"))


def test_load_done_keys_raises_on_a_read_error_naming_the_part(tmp_path):
    data = _part(0)
    (tmp_path / "a.parquet").write_bytes(data)
    (tmp_path / "b.parquet").write_bytes(data)
    (tmp_path / "half.parquet").write_bytes(data[: len(data) // 2])
    files = sorted(str(p) for p in tmp_path.glob("*.parquet"))
    with pytest.raises(OSError, match=r"b\.parquet.*TimeoutError.*nothing was deleted"):
        load_done_keys(FlakyFS("b.parquet"), files)
    # a part whose head and tail are complete but whose footer is garbage: corrupt, not
    # half-written — an error naming it, never a deletion
    n = _footer_length(data)
    garbage = data[: len(data) - 8 - n] + b"\xff" * n + data[-8:]
    (tmp_path / "b.parquet").write_bytes(garbage)
    assert incomplete_parquet(LocalFileSystem(), str(tmp_path / "b.parquet")) is None
    with pytest.raises(OSError, match=r"b\.parquet"):
        load_done_keys(LocalFileSystem(), files)


# ------------------------------------------------------------------ on S3, in a Ray task
@pytest.mark.integration
def test_scan_partial_raw_on_s3_deletes_nothing_on_a_transient_error():
    import ray

    from tests.rayenv import start_test_ray
    from tests.faultproxy import SLOW_DOWN, FaultProxy
    from tests.s3 import s3_endpoint
    from vog_ray.distributed.resume import scan_partial_raw
    from vog_ray.storage import StorageOptions, resolve

    with s3_endpoint() as s3, FaultProxy(s3.endpoint) as proxy:
        start_test_ray(s3.env)
        try:
            good, flaky = _part(0), _part(300, split="test")
            client = s3.client()
            client.put_object(Bucket=s3.bucket, Key="raw/part-0.parquet", Body=good)
            client.put_object(Bucket=s3.bucket, Key="raw/part-1.parquet", Body=good[: len(good) // 2])
            client.put_object(Bucket=s3.bucket, Key="raw/part-2.parquet", Body=flaky)
            # botocore without retries of its own: each attempt of the task fails fast
            via_proxy = StorageOptions(endpoint_url=proxy.url, region=s3.storage.region,
                                       extra={**s3.storage.extra, "config_kwargs": {"retries": {"max_attempts": 1}}})
            fs, raw_path = resolve(s3.url("raw"), via_proxy)

            # every read of part-2 throttled (s3fs and the task's retries give up): the scan
            # fails naming it, and deletes nothing — the truncated part-1 neither
            proxy.rule = lambda method, path, n: SLOW_DOWN if (
                method in ("GET", "HEAD") and "part-2.parquet" in path.split("?", 1)[0]) else None
            with pytest.raises(Exception, match=r"part-2\.parquet.*nothing was deleted"):
                scan_partial_raw(fs, raw_path)
            assert proxy.injected >= 4  # the task ran 1 + 3 retries
            assert s3.list("raw/") == ["raw/part-0.parquet", "raw/part-1.parquet", "raw/part-2.parquet"]

            # the store answers again: only the truncated part goes
            proxy.rule = None
            partial = scan_partial_raw(fs, raw_path)
            assert [p.rsplit("/", 1)[1] for p in partial.removed] == ["part-1.parquet"]
            assert [p.rsplit("/", 1)[1] for p in partial.files] == ["part-0.parquet", "part-2.parquet"]
            assert partial.rows == 600
            assert ray.get(partial.done).tolist() == sorted(_keys(0) + _keys(300, split="test"))
            assert s3.list("raw/") == ["raw/part-0.parquet", "raw/part-2.parquet"]
        finally:
            ray.shutdown()
