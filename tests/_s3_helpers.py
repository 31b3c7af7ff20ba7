"""A real S3-protocol server for tests: moto's `moto_server`, bound to 127.0.0.1 on a free port,
started in its own session and stopped by PID (never by name).

Use the fixtures from a test module with `pytest_plugins = ["_s3_helpers"]`:
  s3_server  (module scope) {"endpoint": "http://127.0.0.1:PORT", "env": {AWS_* for a child},
             "objects": f(bucket, prefix="") -> every key under it (see s3_objects)}
  s3_env     (function scope) the same, with the AWS variables set in this process (monkeypatch)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

START_TIMEOUT = 60  # ~2 s on an idle machine; the cores are shared


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(endpoint: str) -> dict[str, str]:
    """The environment that points pyarrow, boto3 (MLflow) and coun-tune at the server."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _up(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _moto_command(port: int) -> list[str]:
    exe = Path(sys.executable).with_name("moto_server")
    base = [str(exe)] if exe.is_file() else [sys.executable, "-m", "moto.server"]
    return base + ["-H", "127.0.0.1", "-p", str(port)]


@contextmanager
def moto_server(log_dir: Path):
    """Start moto_server; yield its endpoint URL; SIGTERM (then SIGKILL) its PID afterwards."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = Path(log_dir) / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _moto_command(port), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _up(endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"moto_server did not come up (exit {proc.poll()}):\n{log_path.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.2)
        yield endpoint
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield {
            "endpoint": endpoint,
            "env": aws_env(endpoint),
            "objects": lambda bucket, prefix="": s3_objects(endpoint, bucket, prefix),
        }


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    yield s3_server


def s3_filesystem(endpoint: str, allow_bucket_creation: bool = False):
    """pyarrow's S3 filesystem on the moto server at `endpoint`, with the tests' credentials."""
    from pyarrow import fs

    return fs.S3FileSystem(
        endpoint_override=endpoint.split("://", 1)[1],
        scheme="http",
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=allow_bucket_creation,
    )


def s3_objects(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under s3://bucket/prefix (recursive), read with pyarrow directly (not
    through coun_tune.core.storage, so tests do not check the code with itself)."""
    from pyarrow import fs

    s3 = s3_filesystem(endpoint)
    base = f"{bucket}/{prefix}".rstrip("/")
    infos = s3.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path[len(bucket) + 1 :] for i in infos if i.type == fs.FileType.File)
