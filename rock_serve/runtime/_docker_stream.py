"""The rocklet's byte stream through the Docker daemon: one hijacked ``exec start`` connection.

``POST /exec/{id}/start`` with ``Upgrade: tcp`` turns the HTTP connection into a raw
bidirectional stream: what we write is the exec's stdin, and half-closing our side is EOF on it;
what we read is its stdout and stderr in Docker's multiplexing frames (``tty=False``)::

    frame := stream:u8 (1 stdout, 2 stderr)  0:u8[3]  size:u32be  data[size]

The connection is opened with asyncio directly (not through the SDK's blocking socket), so the
Worker's event loop reads every rocklet without a thread per sandbox. :class:`ExecStream` splits
the frames: stdout feeds the :class:`~rock_serve.rocklet.handle.RockletHandle`, stderr is kept
as a short tail for error messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from rock_serve.errors import (
    InvalidConfig,
    RuntimeUnavailable,
    SandboxNotFound,
    SandboxNotRunning,
)
from rock_serve.rocklet.agent import MAX_HEADER, MAX_PAYLOAD
from rock_serve.rocklet.handle import RockletHandle

__all__ = ["DEFAULT_HOST", "DockerAddress", "ExecRocklet", "ExecStream", "open_exec"]

log = logging.getLogger(__name__)

DEFAULT_HOST = "unix:///var/run/docker.sock"
#: Bytes of a rocklet's stderr kept for error messages.
STDERR_TAIL = 8192
#: Seconds :meth:`ExecRocklet.close` waits for the rocklet to exit after EOF on its stdin.
CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True)
class DockerAddress:
    """Where the daemon listens: a unix socket path, or a TCP host and port."""

    url: str
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, url: str | None) -> DockerAddress:
        """Parse ``unix:///path``, ``tcp://host:port`` or ``http://host:port``.

        None means ``$DOCKER_HOST``, else :data:`DEFAULT_HOST`.

        Raises:
            InvalidConfig: another scheme (ssh, npipe) or a TLS daemon, which the rocklet's
                stream does not support.
        """
        from_env = url is None
        url = url or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        parts = urlsplit(url)
        if parts.scheme == "unix":
            path = parts.path or (parts.netloc and "/" + parts.netloc)
            if not path:
                raise InvalidConfig(f"docker runtime: no socket path in {url!r}")
            return cls(url=f"unix://{path}", path=path)
        if parts.scheme in ("tcp", "http"):
            if from_env and os.environ.get("DOCKER_TLS_VERIFY"):
                raise InvalidConfig("docker runtime: TLS daemons are not supported")
            if not parts.hostname or not parts.port:
                raise InvalidConfig(f"docker runtime: {url!r} needs a host and a port")
            host, port = parts.hostname, parts.port
            return cls(url=f"tcp://{host}:{port}", host=host, port=port)
        raise InvalidConfig(
            f"docker runtime: unsupported daemon address {url!r} (use unix:// or tcp://)"
        )

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a connection to the daemon."""
        if self.path is not None:
            return await asyncio.open_unix_connection(self.path)
        assert self.host is not None and self.port is not None
        return await asyncio.open_connection(self.host, self.port)


async def open_exec(
    address: DockerAddress, api_version: str, exec_id: str, *, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Start exec ``exec_id`` attached: returns the raw (multiplexed) reader and the writer.

    Raises:
        RuntimeUnavailable: the daemon cannot be reached or refused with a server error.
        SandboxNotRunning: the container is not running (HTTP 409).
        SandboxNotFound: the exec or its container is gone (HTTP 404).
    """
    body = b'{"Detach":false,"Tty":false}'
    request = (
        f"POST /v{api_version}/exec/{exec_id}/start HTTP/1.1\r\n"
        "Host: docker\r\n"
        "User-Agent: rock-serve\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: Upgrade\r\n"
        "Upgrade: tcp\r\n\r\n"
    ).encode() + body
    conn: list[asyncio.StreamWriter] = []

    async def handshake() -> tuple[int, str, asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await address.connect()
        conn.append(writer)
        writer.write(request)
        await writer.drain()
        status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        text = ""
        if status not in (101, 200):
            length = int(headers.get("content-length", "0") or 0)
            if length:
                text = (await reader.readexactly(length)).decode("utf-8", "replace")
        return status, text, reader, writer

    try:
        status, text, reader, writer = await asyncio.wait_for(handshake(), timeout)
    except BaseException as exc:
        for w in conn:
            w.close()
        if isinstance(exc, asyncio.TimeoutError):
            raise RuntimeUnavailable(
                f"docker daemon at {address.url} did not start an exec in {timeout:g}s"
            ) from None
        if isinstance(exc, OSError | asyncio.IncompleteReadError | asyncio.LimitOverrunError):
            raise RuntimeUnavailable(f"docker daemon at {address.url}: {exc}") from None
        raise
    if status in (101, 200):
        return reader, writer
    writer.close()
    message = _message(text)
    if status == 409:
        raise SandboxNotRunning(message)
    if status == 404:
        raise SandboxNotFound(message)
    raise RuntimeUnavailable(f"docker exec start failed (HTTP {status}): {message}")


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise RuntimeUnavailable(f"bad reply from the docker daemon: {lines[0]!r}") from None
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return status, headers


def _message(text: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(text)["message"])
    return text.strip() or "(no message)"


class ExecStream:
    """Demultiplexes an attached exec's stream: stdout to :attr:`stdout`, stderr to a tail."""

    def __init__(self, raw: asyncio.StreamReader, *, name: str = "") -> None:
        self.name = name
        #: The exec's stdout as a plain byte stream (EOF when the exec's stream ends).
        self.stdout = asyncio.StreamReader(limit=MAX_PAYLOAD + MAX_HEADER)
        self._raw = raw
        self._stderr = bytearray()
        self._task = asyncio.ensure_future(self._pump())

    def stderr_tail(self) -> str:
        """The end of what the exec wrote to stderr."""
        return self._stderr.decode("utf-8", "replace").strip()

    async def _pump(self) -> None:
        raw, out = self._raw, self.stdout
        try:
            while True:
                head = await raw.readexactly(8)
                size = int.from_bytes(head[4:8], "big")
                data = await raw.readexactly(size) if size else b""
                if head[0] == 1:
                    out.feed_data(data)
                elif head[0] == 2:
                    self._stderr += data
                    del self._stderr[:-STDERR_TAIL]
                    log.debug("rocklet %s stderr: %r", self.name, data[:500])
        except asyncio.IncompleteReadError:
            pass  # the daemon ended the stream: the exec exited (or its container stopped)
        except (ConnectionError, OSError) as exc:
            log.debug("rocklet %s: stream failed: %s", self.name, exc)
        except asyncio.CancelledError:
            pass
        finally:
            out.feed_eof()

    async def aclose(self) -> None:
        """Stop reading (the connection itself is closed by the writer's owner)."""
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class ExecRocklet(RockletHandle):
    """A :class:`RockletHandle` whose rocklet runs in a docker exec.

    :meth:`close` half-closes the connection (EOF on the rocklet's stdin: it closes its
    sessions and exits) and waits until the daemon ends the stream, so that when it returns
    the rocklet is gone, as with a child process.
    """

    def __init__(
        self,
        raw: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        name: str = "",
        exec_id: str = "",
    ) -> None:
        self._exec_stream = ExecStream(raw, name=name)
        super().__init__(self._exec_stream.stdout, writer, name=name)
        #: The Docker exec running this rocklet.
        self.exec_id = exec_id

    def stderr_tail(self) -> str:
        """The end of the rocklet's stderr (for error messages)."""
        return self._exec_stream.stderr_tail()

    async def close(self) -> None:
        """EOF to the rocklet, wait for it to exit (bounded), then drop the connection."""
        if self.alive:
            with contextlib.suppress(OSError, RuntimeError):
                if self._writer.can_write_eof():
                    self._writer.write_eof()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wait_closed(), CLOSE_TIMEOUT)
        await super().close()
        await self._exec_stream.aclose()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    def abort(self) -> None:
        """Drop the connection at once, as when the owner's process dies."""
        self._writer.transport.abort()
