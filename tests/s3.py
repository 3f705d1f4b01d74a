"""A real S3 API on loopback for tests: moto's threaded server on 127.0.0.1.

    with s3_endpoint() as s3:
        s3.url("train/part-0.parquet")   # 's3://vog-test-1a2b3c4d/train/part-0.parquet'
        s3.storage                       # StorageOptions(endpoint_url=s3.endpoint, ...)

The test session runs one such server (``s3_session`` in ``tests/conftest.py``); the fixtures
``s3_server`` / ``s3_server_module`` give a test or a module a fresh bucket on it
(:meth:`S3Server.with_bucket`). While a server runs, dummy credentials and ``AWS_ENDPOINT_URL`` are
set in this process's environment (and restored afterwards). A Ray worker sees them only when
they were given to ``ray.init`` (the shared test Ray gets the session server's ``env``): a worker
inherits the env of the raylet. Otherwise the endpoint and the dummy credentials reach the workers
inside the filesystem object that ``storage.resolve`` builds from ``S3Server.storage`` (``s3fs``
with ``client_kwargs={"endpoint_url": ...}``, ``key``/``secret``), which pickles its constructor
arguments. (In production the credentials come from each node's own environment/role; only the
non-secret endpoint travels in the config.)
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Iterator

from vog_ray.storage import StorageOptions

__all__ = ["S3Server", "s3_endpoint", "free_port", "DUMMY_ENV", "DUMMY_SECRET"]

# a secret-looking secret key: every test process and Ray worker signs with it, and a test can
# assert that it appears in no output (moto accepts any credentials)
DUMMY_SECRET = "vogTEST/s3cr3t+KEY-aB9x7Qz2Lm4Np6Rt8Vw0Yy1Uu3Ii5Oo"
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str

    @property
    def storage(self) -> StorageOptions:
        # credentials in `extra` too: a Ray worker started before this server (or on another
        # node) has no AWS_* in its env; the filesystem object carries them when pickled
        return StorageOptions(endpoint_url=self.endpoint, region=DUMMY_ENV["AWS_DEFAULT_REGION"],
                              extra={"key": DUMMY_ENV["AWS_ACCESS_KEY_ID"],
                                     "secret": DUMMY_ENV["AWS_SECRET_ACCESS_KEY"]})

    @property
    def env(self) -> dict[str, str]:
        """Dummy credentials + endpoint, e.g. for ``ray.init(runtime_env={"env_vars": s3.env})``
        when workers build their own ``StorageOptions`` (without ``extra``) from the config."""
        return {**DUMMY_ENV, "AWS_ENDPOINT_URL": self.endpoint}

    def with_bucket(self, bucket: str | None = None) -> "S3Server":
        """The same endpoint with a new, empty bucket (tests that list or snapshot a bucket see
        only their own objects)."""
        srv = S3Server(endpoint=self.endpoint, bucket=bucket or new_bucket_name())
        srv.client().create_bucket(Bucket=srv.bucket)
        return srv

    def url(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path.lstrip('/')}"

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=DUMMY_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"])

    def list(self, prefix: str = "") -> list[str]:
        """Object keys under ``prefix`` (sorted)."""
        keys: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(keys)


def new_bucket_name() -> str:
    return f"vog-test-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def s3_endpoint(bucket: str | None = None) -> Iterator[S3Server]:
    """Start moto's server on a free loopback port, set dummy credentials, create a bucket."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in (*DUMMY_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(DUMMY_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield S3Server(endpoint=endpoint, bucket="").with_bucket(bucket)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
