"""A NATS server with JetStream of our own, for the relay's tests and the bench: Debian's
`nats-server` on a free port with its store in a directory of its own, so that it can be
stopped and started again (its stream kept) without touching the machine's broker.

Also what the tests read a stream with: every message in stream order."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or ("/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None)
    if found is None:
        raise RuntimeError("nats-server is not installed: apt-get install nats-server")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "nats-server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.root / "store")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}: see {self.root / 'nats-server.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen on {self.port} within {timeout:g}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def nats_server(root: Path) -> Iterator[NatsServer]:
    server = NatsServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class StoredMessage(NamedTuple):
    seq: int
    subject: str
    msg_id: str | None
    body: dict[str, Any]


def stream_messages(url: str, stream: str) -> list[StoredMessage]:
    """Every message the stream holds, in stream order."""

    async def read() -> list[StoredMessage]:
        import nats
        from nats.js.errors import NotFoundError

        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            try:
                info = await js.stream_info(stream)
            except NotFoundError:
                return []
            out: list[StoredMessage] = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
                try:
                    m = await js.get_msg(stream, seq)
                except NotFoundError:
                    continue
                out.append(StoredMessage(seq, m.subject or "", (m.headers or {}).get("Nats-Msg-Id"), json.loads(m.data or b"{}")))
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


def stream_count(url: str, stream: str) -> int:
    """Messages the stream holds (0 when there is no such stream)."""

    async def count() -> int:
        import nats
        from nats.js.errors import NotFoundError

        nc = await nats.connect(url)
        try:
            try:
                return int((await nc.jetstream().stream_info(stream)).state.messages)
            except NotFoundError:
                return 0
        finally:
            await nc.close()

    return asyncio.run(count())
