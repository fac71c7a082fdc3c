"""An OpenAI-compatible endpoint inside a sandbox whose answers come from the trainer (stdlib only).

This file is copied into the sandbox and run with the image's ``python3`` (3.8+); it never
imports rock_serve. It is the stand-in for the platform's model service (issue 15.3) that works
with ``network: none``: the endpoint listens on the sandbox's own loopback, and the trainer reads
requests and writes answers through ordinary file and exec operations.

``python3 relay.py serve DIR [--timeout S] -- CMD...``
    Bind ``127.0.0.1:0``, write the port to ``DIR/port``, run CMD with ``OPENAI_BASE_URL`` and
    ``OPENAI_API_KEY`` set, write ``DIR/exit.json`` (``{"exit_code": N}``) when it ends, stop.
    Each ``POST /v1/chat/completions`` body is written to ``DIR/<n>.req.json`` (n = 1, 2, ...);
    the answer is read from ``DIR/<n>.resp.json``: ``{"completion": {...}}`` (a chat.completion
    object, returned as is, or as one SSE chunk when the request asked for ``stream``) or
    ``{"error": "message"}`` (HTTP 502 with an OpenAI-style error body). No answer within the
    timeout is HTTP 504 ``llm_timeout``.

``python3 relay.py next DIR N TIMEOUT``
    Wait until call N is pending or the agent has exited; print one JSON line:
    ``{"kind": "call", "n": N, "request": {...}}``, ``{"kind": "exit", "exit_code": C,
    "calls": K}`` or ``{"kind": "timeout"}``.
"""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

POLL = 0.01


def _write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(data)
    os.rename(tmp, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Relay:
    def __init__(self, directory, timeout):
        self.dir = directory
        self.timeout = timeout
        self.lock = threading.Lock()
        self.count = 0

    def call(self, body):
        with self.lock:
            self.count += 1
            n = self.count
        _write_atomic(os.path.join(self.dir, "%d.req.json" % n), json.dumps(body))
        path = os.path.join(self.dir, "%d.resp.json" % n)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            answer = _read_json(path)
            if isinstance(answer, dict):
                return answer
            time.sleep(POLL)
        return None


def _handler(relay):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, status, obj, content_type="application/json"):
            data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status, code, message):
            self._send(status, {"error": {"code": code, "message": message, "type": code}})

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(
                    200, {"object": "list", "data": [{"id": "rock-relay", "object": "model"}]}
                )
            else:
                self._error(404, "not_found", "no route %s" % self.path)

        def do_POST(self):
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._error(404, "not_found", "no route %s" % self.path)
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
            except ValueError:
                self._error(400, "invalid_request", "the body is not JSON")
                return
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                self._error(400, "invalid_request", "a chat completion request needs messages")
                return
            answer = relay.call(body)
            if answer is None:
                self._error(504, "llm_timeout", "no answer within %gs" % relay.timeout)
            elif "error" in answer:
                self._error(502, "llm_failed", str(answer["error"]))
            elif body.get("stream"):
                self._stream(answer["completion"])
            else:
                self._send(200, answer["completion"])

        def _stream(self, completion):
            chunk = dict(completion, object="chat.completion.chunk")
            chunk["choices"] = [
                {
                    "index": c.get("index", 0),
                    "delta": c.get("message", {}),
                    "finish_reason": c.get("finish_reason"),
                }
                for c in completion.get("choices", [])
            ]
            data = ("data: %s\n\ndata: [DONE]\n\n" % json.dumps(chunk)).encode()
            self._send(200, data, "text/event-stream")

    return Handler


def serve(directory, timeout, argv):
    os.makedirs(directory, exist_ok=True)
    relay = Relay(directory, timeout)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(relay))
    server.daemon_threads = True
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _write_atomic(os.path.join(directory, "port"), str(port))
    env = dict(os.environ)
    env["OPENAI_BASE_URL"] = "http://127.0.0.1:%d/v1" % port
    env.setdefault("OPENAI_API_KEY", "rock-relay")
    try:
        code = subprocess.call(argv, env=env)
    except OSError as exc:
        sys.stderr.write("relay: cannot start %s: %s\n" % (argv[0], exc))
        code = 127
    _write_atomic(
        os.path.join(directory, "exit.json"), json.dumps({"exit_code": code, "calls": relay.count})
    )
    server.shutdown()
    return 0


def next_call(directory, n, timeout):
    deadline = time.monotonic() + timeout
    req = os.path.join(directory, "%d.req.json" % n)
    done = os.path.join(directory, "exit.json")
    while True:
        request = _read_json(req)
        if request is not None:
            print(json.dumps({"kind": "call", "n": n, "request": request}))
            return 0
        ended = _read_json(done)
        if ended is not None:
            print(json.dumps(dict(ended, kind="exit")))
            return 0
        if time.monotonic() >= deadline:
            print(json.dumps({"kind": "timeout"}))
            return 0
        time.sleep(POLL)


def main(argv):
    if len(argv) >= 2 and argv[0] == "serve":
        rest = argv[2:]
        timeout = 600.0
        if len(rest) >= 2 and rest[0] == "--timeout":
            timeout = float(rest[1])
            rest = rest[2:]
        if not rest or rest[0] != "--" or len(rest) < 2:
            sys.stderr.write("usage: relay.py serve DIR [--timeout S] -- CMD...\n")
            return 2
        return serve(argv[1], timeout, rest[1:])
    if len(argv) == 4 and argv[0] == "next":
        return next_call(argv[1], int(argv[2]), float(argv[3]))
    sys.stderr.write(__doc__ or "")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
