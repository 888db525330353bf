"""Real processes for tests and benchmarks: ainode itself, redis-server, DCMTK tools.

Everything listens on 127.0.0.1 on a free port, every wait is bounded, and every
process is stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_SHORT_TMPS: list[Path] = []


def short_tmp(prefix: str = "ainode-") -> Path:
    """A fresh folder with a short path (the embedded Redis socket must fit in 104 bytes).

    Removed at the end of the test session (tests/conftest.py), unless AINODE_KEEP_TMP=1.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    _SHORT_TMPS.append(path)
    return path


def remove_short_tmps() -> None:
    """Remove every folder short_tmp made in this process."""
    while _SHORT_TMPS:
        shutil.rmtree(_SHORT_TMPS.pop(), ignore_errors=True)


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK tools: TCP_NODELAY=1 (see ../shared/PEERS.md)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def echoscu(port: int, called: str = "AINODE", calling: str = "ECHOSCU", timeout: float = 5) -> subprocess.CompletedProcess[str]:
    """Run DCMTK echoscu once against 127.0.0.1:port."""
    t = str(max(1, int(timeout)))
    return subprocess.run(
        ["echoscu", "-to", t, "-ta", t, "-td", t, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        capture_output=True, text=True, timeout=timeout + 10, env=dcmtk_env(),
    )


def storescu(
    files: Sequence[Path | str], port: int, called: str = "AINODE", calling: str = "STORESCU",
    extra: Sequence[str] = (), timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK storescu in one association."""
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=timeout, env=dcmtk_env(),
    )


def scu_store(port: int, items: list, calling: str = "PYSCU", called: str = "AINODE") -> list[int]:
    """C-STORE each item (a Dataset or a Part 10 path) in one pynetdicom association; the statuses."""
    import pydicom
    from pydicom.dataset import Dataset
    from pynetdicom import AE, _config

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    pairs = set()
    for item in items:
        meta = item.file_meta if isinstance(item, Dataset) else pydicom.dcmread(item, stop_before_pixels=True).file_meta
        pairs.add((meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID))
    for sop_class, ts in sorted(pairs):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association was not accepted"
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send files as they are, without decoding them
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def ct_small(**changes: object) -> Any:
    """pydicom's CT_small with a new SOP Instance UID; ``changes`` set attributes (None deletes one)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def store_series(storage: Any, files: Sequence[Path], revision: int) -> str:
    """Store Part 10 files as the node would and record them as a revision (plus the earlier
    revision's instances); returns the study UID. For worker tests and benchmarks."""
    import pydicom

    from node.enqueue import job_id
    from node.store import Revision

    instances = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        storage.write_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [f.read_bytes()])
        instances[ds.SOPInstanceUID] = ds.SeriesInstanceUID
    study = str(ds.StudyInstanceUID)
    prior = storage.latest_revision(study)
    all_instances = {**(prior.instances if prior else {}), **instances}
    storage.write_revision(Revision(study, revision, all_instances, 0.0, "quiet", job_id(study, revision)))
    return study


@contextmanager
def serving(server: Any) -> Iterator[Any]:
    """A socketserver-style server (http.server, hl7apy's MLLPServer) answering in a thread; shut down and
    closed on exit."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def redis_server_binary() -> str:
    from node.embedded_redis import redis_server_binary as find

    return find()


class RedisServer:
    """A throw-away redis-server on a free 127.0.0.1 port, no persistence."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        wait_until(self._answers, 10, f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        import redis

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}")
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=5)

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            if kill:
                self.proc.kill()
                self.proc.wait(10)
            else:
                stop_process(self.proc)
            self.proc = None


def write_config(path: Path, *, port: int, storage: Path, redis_url: str = "", quiet: float = 1.0,
                 max_wait: float = 1800, min_free_mb: int = 1, callers: Iterable[tuple[str, str | None]] = (),
                 ae_title: str = "AINODE", extra: str = "", node_extra: str = "", web_port: int = 0) -> Path:
    """A config file for a test node; ``node_extra``: more lines of its [node] table; ``web_port``
    0 turns [web] off (the tests that want it pick a free port)."""
    lines = [
        "[node]",
        f'ae_title = "{ae_title}"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f'storage = "{storage}"',
        f"min_free_mb = {min_free_mb}",
        *([node_extra] if node_extra else []),
        "[completion]",
        f"quiet_seconds = {quiet}",
        f"max_wait_seconds = {max_wait}",
        "[redis]",
        f'url = "{redis_url}"',
        "[web]",
        f"enabled = {'true' if web_port else 'false'}",
        f"port = {web_port or 8112}",
    ]
    for ae, host in callers:
        lines += ["[[callers]]", f'ae_title = "{ae}"'] + ([f'host = "{host}"'] if host else [])
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


class NodeProcess:
    """``ainode serve`` as a subprocess on a free port, with its log in a file."""

    def __init__(self, workdir: Path, *, redis_url: str = "", quiet: float = 1.0, max_wait: float = 1800,
                 min_free_mb: int = 1, callers: Iterable[tuple[str, str | None]] = (), port: int | None = None,
                 workers: int = -1, extra_config: str = "", node_config: str = "", storage: Path | None = None,
                 web_port: int = 0) -> None:
        self.workdir = workdir
        self.workers = workers
        self.port = port or free_port()
        self.storage = storage or workdir / "storage"
        self.config = write_config(
            workdir / "ainode.toml", port=self.port, storage=self.storage, redis_url=redis_url, quiet=quiet,
            max_wait=max_wait, min_free_mb=min_free_mb, callers=callers, extra=extra_config, node_extra=node_config,
            web_port=web_port,
        )
        self.web_port = web_port
        self.log = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.redis_url = redis_url

    def start(self) -> "NodeProcess":
        env = {k: v for k, v in os.environ.items() if k != "AINODE_CONFIG"}
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "node", "--config", str(self.config), "--log-level", "DEBUG", "serve",
                 "--workers", str(self.workers)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir, env=env,
            )
        wait_until(self._ready, READY_TIMEOUT_S, f"ainode on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"ainode exited with {self.proc.returncode}:\n{self.log_text()}")
        return "ainode listening" in self.log_text()[self._log_start :]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc, timeout=40)
        code = self.proc.returncode
        self.proc = None
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def redis(self) -> Any:
        """A client of the node's Redis (its embedded one when no URL was given)."""
        import redis

        if self.redis_url:
            return redis.Redis.from_url(self.redis_url, socket_timeout=5)
        return redis.Redis(unix_socket_path=str(self.storage / "redis" / "redis.sock"), socket_timeout=5)

    def embedded_redis_pid(self) -> int | None:
        try:
            return int((self.storage / "redis" / "redis.pid").read_text())
        except (OSError, ValueError):
            return None

    def stored_files(self) -> list[Path]:
        return sorted((self.storage / "studies").glob("*/*/*.dcm"))

    def revisions(self, study_uid: str) -> list[Path]:
        return sorted((self.storage / "state" / study_uid).glob("rev-*.json"))


def pid_alive(pid: int) -> bool:
    from node.embedded_redis import pid_alive as alive

    return alive(pid)


def kill_pid(pid: int) -> None:
    """Stop a process we started, by PID, and wait until it is gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_until(lambda: not pid_alive(pid), 10, f"pid {pid} to exit")
    except AssertionError:
        os.kill(pid, signal.SIGKILL)


class Orthanc:
    """A throw-away Orthanc (Debian package) as the PACS: DICOM and HTTP on free 127.0.0.1 ports."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", check_called_aet: bool = True) -> None:
        self.workdir = workdir
        self.aet = aet
        self.port = free_port()
        self.http_port = free_port()
        self.check_called_aet = check_called_aet
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """Orthanc's configuration (a subclass adds plugins)."""
        return {
            "Name": "ainode-test-pacs", "DicomAet": self.aet, "DicomPort": self.port, "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "db"), "IndexDirectory": str(self.workdir / "db"),
            "SaveJobs": False, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": self.check_called_aet, "Plugins": [], "ConcurrentJobs": 1,
        }

    def start(self) -> "Orthanc":
        import json as _json

        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(_json.dumps(self.config(), indent=1))
        self.log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=dcmtk_env())
        wait_until(self._ready, 20, f"Orthanc on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {self.proc.returncode}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str) -> Any:
        import json as _json
        import urllib.request

        with urllib.request.urlopen(self.base + path, timeout=5) as rsp:
            return _json.loads(rsp.read())

    def instances_of_study(self, study_uid: str, modality: str | None = None) -> list[dict[str, Any]]:
        """Orthanc's instances (with their tags) in the study of that StudyInstanceUID."""
        out = []
        for sid in self.get("/studies"):
            study = self.get(f"/studies/{sid}")
            if study["MainDicomTags"].get("StudyInstanceUID") != study_uid:
                continue
            for series_id in study["Series"]:
                series = self.get(f"/series/{series_id}")
                if modality and series["MainDicomTags"].get("Modality") != modality:
                    continue
                for iid in series["Instances"]:
                    out.append(self.get(f"/instances/{iid}/simplified-tags") | {"_id": iid})
        return out

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # its folder is thrown away: no need for the 3 s graceful stop
            self.proc.wait(10)
            self.proc = None
            self.log.close()


PLUGIN_DIR = Path("/usr/share/orthanc/plugins")  # Debian's orthanc and orthanc-dicomweb packages
DICOMWEB_PLUGIN = PLUGIN_DIR / "libOrthancDicomWeb.so"


class DicomWebOrthanc(Orthanc):
    """Orthanc with its DICOMweb plugin at ``/dicom-web/`` (STOW-RS, QIDO-RS, WADO-RS) and, with
    ``users``, HTTP basic auth for its whole HTTP side; a context manager."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None, aet: str = "ORTHANC") -> None:
        super().__init__(workdir, aet=aet)
        self.users = dict(users or {})

    @property
    def dicomweb_url(self) -> str:
        return self.base + "/dicom-web"

    def config(self) -> dict[str, Any]:
        return super().config() | {
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "AuthenticationEnabled": bool(self.users), "RegisteredUsers": self.users,
        }

    def get(self, path: str) -> Any:
        """GET a REST path as JSON, as the first registered user."""
        import json as _json

        return _json.loads(self.get_bytes(path))

    def get_bytes(self, path: str) -> bytes:
        """GET a REST path (e.g. ``/instances/{id}/file``), as the first registered user."""
        import base64
        import urllib.request

        request = urllib.request.Request(self.base + path)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as rsp:
            return bytes(rsp.read())

    def _ready(self) -> bool:
        if not super()._ready():
            return False
        import urllib.error

        try:  # the plugin is up too
            self.get_bytes("/dicom-web/studies")
            return True
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"Orthanc DICOMweb not serving ({exc}); see {self.workdir / 'orthanc.log'}") from exc
        except OSError:
            return False

    def __enter__(self) -> "DicomWebOrthanc":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
