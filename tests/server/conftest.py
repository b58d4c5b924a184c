"""Fixtures of the server tests: a real S3-compatible server on loopback for the artifact store."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from tests.conftest import free_port


@dataclass(frozen=True)
class S3:
    """moto's S3 server on 127.0.0.1: its endpoint, a bucket, and how to reach it (fsspec options, or the AWS_*
    environment a server process reads)."""

    endpoint: str
    bucket: str

    @property
    def options(self) -> dict:
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint,
                                                                         "region_name": "us-east-1"}}

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def url(self) -> str:
        """A fresh prefix in the bucket: one test's store."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:12]}"

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)


@pytest.fixture(scope="session")
def s3() -> S3:
    """moto in server mode (a real HTTP S3 API, in a thread of this process) with one bucket; stopped at the end."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = S3(f"http://127.0.0.1:{port}", "steerserve-test")
        import boto3

        boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1").create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        server.stop()


def stored_copy(data_dir, original, name: str):
    """The server's stored copy (under `<data-dir>/adapters/<id>/`) of the file `name` of the adapter registered
    by path from `original`: the one with the same bytes."""
    data = (original / name).read_bytes()
    (copy,) = [p for p in (data_dir / "adapters").glob(f"*/{name}") if p.read_bytes() == data]
    return copy
