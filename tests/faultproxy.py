"""A fault-injecting TCP proxy for tests: sits between the gateway and Postgres, Redis or
an upstream, and breaks the link on command.

It listens on 127.0.0.1 port 0 and forwards every accepted connection to one target
(as asyncpg's TCPFuzzingProxy does). A command changes the proxy's mode; the mode holds
for existing and new connections until `restore()`:

    delay(ms)    forward each chunk `ms` milliseconds late (both directions)
    stall()      keep every socket open, forward nothing (new connections too)
    cut()        close every connection with FIN; new ones are closed on accept
    reset()      abort every connection with RST (SO_LINGER 0); new ones too
    blackhole()  accept new connections and never answer (no target connection is
                 made); existing connections stall
    restore()    forward normally again; stalled bytes flow on

It only ever binds and connects to loopback and never inspects what it forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

_RST_LINGER = struct.pack("ii", 1, 0)

PASS, STALL, CUT, RESET, BLACKHOLE = "pass", "stall", "cut", "reset", "blackhole"


def _rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    writer.transport.abort()


class _Link:
    """One proxied connection: the client side and (once made) the target side."""

    __slots__ = ("client", "target", "tasks")

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.target) if w is not None]

    def close(self, rst: bool) -> None:
        for w in self.writers():
            if rst:
                _rst(w)
            else:
                w.transport.close()


class FaultProxy:
    """`await FaultProxy(port).start()`; `proxy.port` is where to point the client."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.mode = PASS
        self.delay_s = 0.0
        self.accepted = 0
        self.bytes_forwarded = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close(rst=False)
            for t in link.tasks:
                t.cancel()
        self._links.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def dsn(self, real_dsn: str) -> str:
        """`real_dsn` with its host:port replaced by the proxy's (Postgres URLs only)."""
        scheme, rest = real_dsn.split("://", 1)
        auth, _, hostpart = rest.rpartition("@")
        _, _, tail = hostpart.partition("/")
        return f"{scheme}://{auth + '@' if auth else ''}127.0.0.1:{self.port}/{tail}"

    # --- commands ---------------------------------------------------------------------

    def delay(self, ms: float) -> None:
        self.mode = PASS
        self.delay_s = ms / 1000
        self._flowing.set()

    def stall(self) -> None:
        self.mode = STALL
        self._flowing.clear()

    def cut(self) -> None:
        self.mode = CUT
        self._flowing.clear()
        self._drop_all(rst=False)

    def reset(self) -> None:
        self.mode = RESET
        self._flowing.clear()
        self._drop_all(rst=True)

    def blackhole(self) -> None:
        self.mode = BLACKHOLE
        self._flowing.clear()

    def restore(self) -> None:
        self.mode = PASS
        self.delay_s = 0.0
        self._flowing.set()

    @property
    def connections(self) -> int:
        return len(self._links)

    # --- plumbing ---------------------------------------------------------------------

    def _drop_all(self, rst: bool) -> None:
        for link in list(self._links):
            link.close(rst)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            if self.mode == CUT:
                writer.transport.close()
                return
            if self.mode == RESET:
                _rst(writer)
                return
            if self.mode == BLACKHOLE:
                # Swallow whatever arrives and never answer, until the peer gives up.
                while await reader.read(65536):
                    pass
                return
            await self._flowing.wait()
            if self.mode in (CUT, RESET):
                link.close(self.mode == RESET)
                return
            try:
                t_reader, t_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                _rst(writer)
                return
            link.target = t_writer
            up = asyncio.create_task(self._pipe(reader, t_writer))
            down = asyncio.create_task(self._pipe(t_reader, writer))
            link.tasks = [up, down]
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self._links.discard(link)
            for w in link.writers():
                w.transport.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                await self._flowing.wait()
                if dst.transport.is_closing():
                    break
                dst.write(data)
                self.bytes_forwarded += len(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One side finished: let the other see EOF (or the abort already happened).
            if not dst.transport.is_closing():
                dst.transport.close()
