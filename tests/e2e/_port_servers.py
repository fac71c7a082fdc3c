"""Servers that tests and bench/ports.py start INSIDE a sandbox (standard library only).

Run as ``python3 _port_servers.py PORTS_FILE``: listens on 127.0.0.1 (ephemeral ports) with

- ``http``: GET ``/echo`` -> JSON of method, target and headers; GET ``/blob?n=N`` -> N bytes
  (a repeating pattern); POST/PUT ``/sum`` -> JSON ``{"length", "sha256"}`` of the body;
  GET ``/status/N`` -> status N with a body and two Set-Cookie headers;
- ``ws``: a WebSocket echo (text and binary; a message ``close:N`` closes with code N);
- ``tcp``: an echo until EOF, then close;

and writes ``{"http": P, "ws": P, "tcp": P}`` to PORTS_FILE once all of them listen.
"""

import asyncio
import base64
import hashlib
import json
import os
import struct
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

_PATTERN = bytes(range(256)) * 256


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def log_message(self, *args):
        pass

    def _reply(self, status, body, ctype="application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/echo":
            body = {"method": "GET", "target": self.path, "headers": dict(self.headers.items())}
            self._reply(200, json.dumps(body).encode())
        elif url.path == "/blob":
            n = int(parse_qs(url.query)["n"][0])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            while n > 0:
                piece = _PATTERN[: min(n, len(_PATTERN))]
                self.wfile.write(piece)
                n -= len(piece)
        elif url.path.startswith("/status/"):
            code = int(url.path.rsplit("/", 1)[1])
            extra = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
            self._reply(code, b"status %d" % code, "text/plain", extra)
        else:
            self._reply(404, b'{"nope": true}')

    do_HEAD = do_GET

    def do_POST(self):
        digest, length = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data = self.rfile.read(size)
                self.rfile.readline()
                digest.update(data)
                length += len(data)
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining:
                data = self.rfile.read(min(remaining, 1 << 16))
                digest.update(data)
                length += len(data)
                remaining -= len(data)
        self._reply(200, json.dumps({"length": length, "sha256": digest.hexdigest()}).encode())

    do_PUT = do_POST


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _ws_frame(opcode, data):
    head = bytes([0x80 | opcode])
    n = len(data)
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + struct.pack(">H", n)
    else:
        head += bytes([127]) + struct.pack(">Q", n)
    return head + data


async def ws_echo(reader, writer):
    request = await reader.readuntil(b"\r\n\r\n")
    headers = {}
    for line in request.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    accept = base64.b64encode(
        hashlib.sha1(headers["sec-websocket-key"].encode() + _WS_GUID).digest()
    )
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    message, opcode = b"", 0
    try:
        while True:
            b1, b2 = await reader.readexactly(2)
            n = b2 & 0x7F
            if n == 126:
                (n,) = struct.unpack(">H", await reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack(">Q", await reader.readexactly(8))
            mask = await reader.readexactly(4) if b2 & 0x80 else b"\0\0\0\0"
            data = bytearray(await reader.readexactly(n))
            for i in range(len(data)):
                data[i] ^= mask[i % 4]
            op = b1 & 0x0F
            if op == 8:
                writer.write(_ws_frame(8, bytes(data[:2])))
                break
            if op == 9:
                writer.write(_ws_frame(10, bytes(data)))
                continue
            if op in (1, 2):
                message, opcode = bytes(data), op
            elif op == 0:
                message += bytes(data)
            if b1 & 0x80:
                if message.startswith(b"close:"):
                    writer.write(_ws_frame(8, struct.pack(">H", int(message[6:]))))
                    break
                writer.write(_ws_frame(opcode, message))
            await writer.drain()
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


async def tcp_echo(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


async def main(ports_file):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    ws = await asyncio.start_server(ws_echo, "127.0.0.1", 0)
    tcp = await asyncio.start_server(tcp_echo, "127.0.0.1", 0)
    ports = {
        "http": httpd.server_address[1],
        "ws": ws.sockets[0].getsockname()[1],
        "tcp": tcp.sockets[0].getsockname()[1],
    }
    with open(ports_file + ".tmp", "w") as f:
        json.dump(ports, f)
    os.rename(ports_file + ".tmp", ports_file)
    await asyncio.gather(ws.serve_forever(), tcp.serve_forever())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
