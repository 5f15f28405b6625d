"""A fast SMTP sink in its own process: answers 250 at once, counts messages and timestamps recipients."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized
from typing import Any

# (recipient, time.time() when the end of DATA was answered with 250)
Record = tuple[str, float]

_EHLO = (
    b"250-bench-sink\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
)
_OK = b"250 2.0.0 Ok\r\n"
_END = b"\r\n.\r\n"
# The reply to the end of DATA, as mailer's SMTP transport records it in the delivery log.
ACCEPTED_TEXT = "2.0.0 Ok: queued"


@dataclass
class _Stats:
    counter: Any  # a shared ctypes int: the parent reads it without asking the sink
    records: list[Record] = field(default_factory=list)


class _SmtpSink(asyncio.Protocol):
    """One client connection; parses commands from a buffer, so pipelined clients work too."""

    def __init__(self, stats: _Stats) -> None:
        self.stats = stats
        self.buffer = bytearray()
        self.in_data = False
        self.scanned = 0  # how far DATA was already searched for the terminator
        self.recipients: list[str] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies: list[bytes] = []
        while self.buffer:
            if self.in_data:
                if not self._data_step(replies):
                    break
            elif not self._command_step(replies):
                break
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))

    def _data_step(self, replies: list[bytes]) -> bool:
        buf = self.buffer
        if buf.startswith(b".\r\n"):  # empty body: the terminator's CRLF was the DATA line's
            end, cut = 0, 3
        else:
            end = buf.find(_END, max(self.scanned - 4, 0))
            if end < 0:
                self.scanned = len(buf)
                return False
            cut = end + len(_END)
        del buf[:cut]
        self.in_data, self.scanned = False, 0
        now = time.time()
        self.stats.records.extend((rcpt, now) for rcpt in self.recipients)
        self.stats.counter.value += 1
        self.recipients = []
        replies.append(b"250 " + ACCEPTED_TEXT.encode() + b"\r\n")
        return True

    def _command_step(self, replies: list[bytes]) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        verb = line[:4].upper()
        if verb == b"EHLO":
            replies.append(_EHLO)
        elif verb == b"RCPT":
            start, stop = line.find(b"<"), line.find(b">")
            self.recipients.append(line[start + 1 : stop].decode("utf-8", "replace").lower())
            replies.append(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            self.in_data = True
            replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"RSET":
            self.recipients = []
            replies.append(_OK)
        elif verb == b"QUIT":
            replies.append(b"221 2.0.0 Bye\r\n")
            if self.transport is not None:
                self.transport.write(b"".join(replies))
                replies.clear()
                self.transport.close()
            return False
        elif verb in (b"HELO", b"MAIL", b"NOOP"):
            if verb == b"MAIL":
                self.recipients = []
            replies.append(b"250 bench-sink\r\n" if verb == b"HELO" else _OK)
        else:
            replies.append(b"502 5.5.2 Command not recognised\r\n")
        return True


async def _serve(port: int, stats: _Stats, control: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    server = await loop.create_server(lambda: _SmtpSink(stats), "127.0.0.1", port, backlog=1024)

    def on_command() -> None:
        try:
            command = control.recv()
        except (EOFError, OSError):
            command = "stop"
        if command == "take":
            records, stats.records = stats.records, []
            control.send(records)
        elif command == "ping":
            control.send("pong")
        elif not stop.done():
            stop.set_result(None)

    loop.add_reader(control.fileno(), on_command)
    control.send("ready")
    try:
        await stop
    finally:
        loop.remove_reader(control.fileno())
        server.close()


def _main(port: int, counter: Any, control: multiprocessing.connection.Connection) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(port, _Stats(counter), control))


class Sink:
    """Handle on the sink process: `count` is live (shared memory); `take()` fetches the timestamps."""

    name = "bench/sink.py (asyncio, own process)"

    def __init__(self, port: int) -> None:
        self.port = port
        ctx = multiprocessing.get_context("spawn")
        self._counter: Synchronized[int] = ctx.Value("q", 0, lock=False)
        self._control, child = ctx.Pipe()
        self.process = ctx.Process(target=_main, args=(port, self._counter, child), daemon=True)

    def start(self, timeout: float = 20.0) -> None:
        self.process.start()
        if not self._control.poll(timeout) or self._control.recv() != "ready":
            raise RuntimeError("SMTP sink did not start")

    @property
    def pid(self) -> int:
        return int(self.process.pid or 0)

    @property
    def count(self) -> int:
        return int(self._counter.value)

    def take(self, timeout: float = 60.0) -> list[Record]:
        """All (recipient, accepted_at) since the last take; clears them in the sink."""
        self._control.send("take")
        if not self._control.poll(timeout):
            raise TimeoutError("SMTP sink did not answer")
        records: list[Record] = self._control.recv()
        return records

    def wait_for(
        self, total: int, *, timeout: float, interval: float = 0.005, alive: Callable[[], bool] | None = None
    ) -> bool:
        """Poll the shared counter until it reaches `total`; False on timeout or once `alive()` is false."""
        deadline = time.monotonic() + timeout
        while self.count < total:
            if time.monotonic() > deadline or not self.process.is_alive() or (alive and not alive()):
                return False
            time.sleep(interval)
        return True

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self._control.send("stop")
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
