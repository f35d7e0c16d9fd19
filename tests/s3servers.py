"""Real S3-protocol servers for tests, each on a free port and stopped afterwards. Helpers, not tests.

* ``moto_server()`` — moto's standalone server: broad S3 API, accepts any credentials and never expires
  presigned URLs. ``moto_server(check_signatures=True)`` creates an IAM user and makes moto verify
  request signatures (presigned URLs do not work in that mode).
* ``s3rver_server()`` — the npm package s3rver: checks the access key and presigned expiry (its SigV4
  check stops at the access key: a wrong secret key is accepted).
* ``real_minio_from_env()`` — a real MinIO given by ``TUWEN_TEST_MINIO_*`` variables, or None.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import quote

from tests.ports import free_port

S3RVER_DIR = Path(__file__).parent / "s3rver"
S3RVER_INSTALL = "npm ci --prefix tests/s3rver --no-audit --no-fund"


@dataclass(frozen=True)
class S3Endpoint:
    endpoint: str  #: host:port, no scheme
    access_key: str
    secret_key: str
    secure: bool = False

    @property
    def base_url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def object_url(self, bucket: str, key: str) -> str:
        """The plain (unsigned) path-style URL of an object."""
        return f"{self.base_url}/{bucket}/{quote(key)}"


@contextmanager
def moto_server(*, check_signatures: bool = False) -> Iterator[S3Endpoint]:
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing: install the dev extras (moto[server])")
    port = free_port()
    with _process([str(exe), "-H", "127.0.0.1", "-p", str(port)], port, "moto_server"):
        endpoint = S3Endpoint(f"127.0.0.1:{port}", "testing", "testing")
        yield _with_signature_checks(endpoint) if check_signatures else endpoint


@contextmanager
def s3rver_server() -> Iterator[S3Endpoint]:
    node = shutil.which("node")
    script = S3RVER_DIR / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if node is None:
        raise RuntimeError("node is not installed; s3rver needs Node.js (Debian: apt-get install nodejs npm)")
    if not script.exists():
        raise RuntimeError(f"s3rver is not installed; run `{S3RVER_INSTALL}` in the repository root")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="s3rver-") as data:
        cmd = [node, str(script), "-d", data, "-a", "127.0.0.1", "-p", str(port), "-s", "--no-vhost-buckets"]
        with _process(cmd, port, "s3rver"):
            yield S3Endpoint(f"127.0.0.1:{port}", "S3RVER", "S3RVER")


def real_minio_from_env() -> S3Endpoint | None:
    """A real MinIO when ``TUWEN_TEST_MINIO_ENDPOINT`` (host:port) and its keys are set."""
    endpoint = os.environ.get("TUWEN_TEST_MINIO_ENDPOINT", "").strip()
    if not endpoint:
        return None
    return S3Endpoint(
        endpoint=endpoint,
        access_key=os.environ.get("TUWEN_TEST_MINIO_ACCESS_KEY", "minioadmin"),
        secret_key=os.environ.get("TUWEN_TEST_MINIO_SECRET_KEY", "minioadmin"),
        secure=os.environ.get("TUWEN_TEST_MINIO_SECURE", "").strip().lower() in ("1", "true", "yes", "on"),
    )


@contextmanager
def _process(cmd: list[str], port: int, name: str, timeout_s: float = 60.0) -> Iterator[None]:
    """Run ``cmd`` until the block ends; yield once it answers HTTP on ``port``. Output goes to a log file."""
    with tempfile.TemporaryFile(prefix=f"{name}-", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_answers(proc, f"http://127.0.0.1:{port}/", name, log, timeout_s)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_answers(proc: subprocess.Popen[bytes], url: str, name: str, log: IO[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before answering:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:  # any HTTP answer means it is up
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not answer on {url} within {timeout_s:.0f} s:\n{_tail(log)}")


def _tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-4000:]


def _with_signature_checks(plain: S3Endpoint) -> S3Endpoint:
    """Create an IAM user allowed ``s3:*`` on a fresh moto, then make moto verify every signature."""
    import boto3  # type: ignore[import-untyped]  # moto[server] depends on it

    iam = boto3.client("iam", endpoint_url=plain.base_url, region_name="us-east-1",
                       aws_access_key_id=plain.access_key, aws_secret_access_key=plain.secret_key)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.create_user(UserName="tuwen")
    arn = iam.create_policy(PolicyName="tuwen-s3", PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
    iam.attach_user_policy(UserName="tuwen", PolicyArn=arn)
    key = iam.create_access_key(UserName="tuwen")["AccessKey"]
    # moto counts requests served without auth; from 0 on, every request must be signed correctly.
    reset = urllib.request.Request(f"{plain.base_url}/moto-api/reset-auth", data=b"0", method="POST",
                                   headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(reset, timeout=10):
        pass
    return S3Endpoint(plain.endpoint, key["AccessKeyId"], key["SecretAccessKey"], plain.secure)
