"""A small TCP fault proxy for tests and the scoreboard: put it between a consumer and Redis,
then cut the consumer off.

``blackhole()`` keeps every connection open but silently drops all bytes both ways (what a
network partition looks like: no reset, no answer); new connections are accepted and
blackholed too. ``heal()`` forwards again (connections that were blackholed are closed, as a
real partition's would have timed out). Runs in the caller's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib

from bales_stream.embedded_redis import free_port

CHUNK_BYTES = 65536


class FaultProxy:
    """Forwards 127.0.0.1:<port> to an upstream host:port, until told to misbehave."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.blackholed = False
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def url(self, db: int = 0) -> str:
        """A redis:// URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    def blackhole(self) -> None:
        """Drop every byte, both ways, on all connections, old and new."""
        self.blackholed = True

    def heal(self) -> None:
        """Forward again; connections that lived through the blackhole are closed."""
        self.blackholed = False
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pumps):
            task.cancel()
        for writer in list(self._writers):
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(CHUNK_BYTES):
                if self.blackholed:
                    self._writers.add(sink)  # closed on heal(), as a partition would
                    continue  # the partition: the bytes vanish
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.close()
