"""rocklet: the agent that runs inside every sandbox.

Standard library only (Python >= 3.8), so it runs with whatever ``python3`` an image has:
``python3 -I agent.py [--root DIR]``. It reads requests from stdin and writes replies to stdout.

Framing (both directions)::

    frame := header_len:u32be  payload_len:u32be  header:JSON(UTF-8)  payload:bytes

Host -> agent headers:

- ``{"id": n, "op": "session.run", "args": {...}}``: start request ``n`` (payload: op input).
  With ``"more": true`` further ``{"id": n, "type": "chunk"}`` frames carry input bytes and
  ``{"id": n, "type": "end"}`` ends them (``file.write``, ``tar.upload``).
- ``{"id": n, "type": "cancel"}``: give up on request ``n``.

A request may carry ``"trace": "<32 hex>"`` (the host caller's W3C trace id): the agent keeps
it for that op, writes it in its stderr log lines about the op (one JSON object a line:
``{"ts": unix seconds, "level", "logger": "rocklet", "event": "op.start"|"op.end", "trace",
"op", "id", "ms"?, "outcome"?}``) and puts it in the error it returns (``error.trace``). Untraced ops are
not logged.

Agent -> host headers:

- ``{"id": n, "type": "chunk", "stream": "output"|"stdout"|"stderr"|"data"}``: streamed bytes.
- ``{"id": n, "type": "result", "data": {...}}``: the final reply (payload: bulk output).
- ``{"id": n, "type": "error", "error": {"code", "message", "details"?}}``: the final error reply.

Many requests run at once; replies are matched by id. EOF on stdin closes every session and
exits with status 0.
"""

import errno
import json
import os
import re
import signal
import stat as stat_mod
import struct
import sys
import time

# typing is not imported either (~5 ms): the annotations below are strings for mypy.
TYPE_CHECKING = False

# shutil, tarfile and threading are imported where used: start-up time is sandbox create time.
# So is asyncio (~45 ms): the fast start (see below) serves the first requests without it.


class _LazyAsyncio:
    """``asyncio`` imported at its first use."""

    def __getattr__(self, name):
        global asyncio
        import asyncio

        return getattr(asyncio, name)


if TYPE_CHECKING:
    import asyncio
    from typing import Any
else:
    asyncio = _LazyAsyncio()

VERSION = "1"
HEADER = struct.Struct(">II")
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 64 << 20
CHUNK = 256 << 10
READ_SIZE = 256 << 10
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_OUTPUT = 1 << 20
#: Sessions one agent keeps at once unless the host asks for another bound (``max_sessions``).
DEFAULT_MAX_SESSIONS = 32
#: Seconds between SIGINT and SIGKILL of a timed-out command, and before a shell restart.
KILL_GRACE = 1.0
SESSION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
#: Bytes of trace lines one agent writes in its life (agent.log is never rotated): past it, one
#: ``trace.capped`` line and no more.
TRACE_LOG_BYTES = 4 << 20
_trace_written = [0]


def _trace_log(fields):
    """One structured log line on stderr (the host keeps it: agent.log, docker's stream).

    One unbuffered write of a whole line (no text layer, no flush): lines of concurrent ops
    never interleave and the line is on file before the op's reply is sent. At most
    ``TRACE_LOG_BYTES`` in all.
    """
    if _trace_written[0] >= TRACE_LOG_BYTES:
        return
    line = {"ts": round(time.time(), 6), "level": "info", "logger": "rocklet"}
    line.update(fields)
    data = (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8")
    _trace_written[0] += len(data)
    if _trace_written[0] >= TRACE_LOG_BYTES:
        data = b'{"level":"warning","logger":"rocklet","event":"trace.capped"}\n'
    try:
        os.write(2, data)
    except OSError:
        pass


# ---------------------------------------------------------------------------- framing


def encode_frame(header: "dict[str, Any]", payload: bytes = b"") -> bytes:
    """Encode one frame (header dict + payload bytes)."""
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return HEADER.pack(len(head), len(payload)) + head + payload


class FrameError(Exception):
    """A frame could not be decoded; the stream cannot be trusted after it."""


class FrameTooLarge(FrameError):
    """A frame's prefix announces more than the limits; its bytes can still be skipped."""

    def __init__(self, head_len, payload_len):
        super().__init__("frame too large: header %d, payload %d" % (head_len, payload_len))
        self.size = head_len + payload_len


async def read_frame(
    reader: "asyncio.StreamReader",
) -> "tuple[dict[str, Any], bytes] | None":
    """Read one frame; ``None`` on clean EOF; :class:`FrameError` when malformed."""
    try:
        prefix = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("truncated frame prefix") from None
        return None
    head_len, payload_len = HEADER.unpack(prefix)
    if head_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
        raise FrameTooLarge(head_len, payload_len)
    try:
        head = await reader.readexactly(head_len)
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError:
        raise FrameError("truncated frame") from None
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FrameError("frame header is not JSON") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header, payload


async def _skip(reader, n):
    """Discard ``n`` bytes of the stream; False on EOF first."""
    while n > 0:
        data = await reader.read(min(n, READ_SIZE))
        if not data:
            return False
        n -= len(data)
    return True


# ---------------------------------------------------------------------------- errors


class AgentError(Exception):
    """An error with a code from rock_serve.errors.ErrorCode."""

    def __init__(self, code, message, details=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    def body(self):
        body = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


#: Errors of a sandbox at one of its limits (pids, memory, open files, disk).
_EXHAUSTED = {
    errno.EAGAIN: "pids",
    errno.ENOMEM: "memory",
    errno.EMFILE: "files",
    errno.ENFILE: "files",
    errno.ENOSPC: "disk",
    errno.EDQUOT: "disk",
}


def _os_error(exc, path=""):
    if exc.errno in _EXHAUSTED:
        where = path or exc.filename
        return AgentError(
            "resource_exhausted",
            "%s%s: the sandbox is at its %s limit"
            % (exc.strerror or exc, " (%s)" % where if where else "", _EXHAUSTED[exc.errno]),
            {"resource": _EXHAUSTED[exc.errno]},
        )
    code = {
        errno.ENOENT: "file_not_found",
        errno.EISDIR: "is_a_directory",
        errno.ENOTDIR: "not_a_directory",
        errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied",
        errno.EEXIST: "conflict",
        errno.ENOTEMPTY: "conflict",
    }.get(exc.errno, "invalid_request")
    return AgentError(code, "%s: %s" % (exc.strerror or exc, path or exc.filename or ""))


def _error_body(exc):
    """The error object of an op that raised ``exc`` (never a traceback)."""
    if isinstance(exc, AgentError):
        return exc.body()
    if isinstance(exc, OSError):
        return _os_error(exc).body()
    if isinstance(exc, RuntimeError):
        # "can't start new thread": the sandbox is at its pids limit (threads count).
        err = AgentError("internal", "%s: %s" % (type(exc).__name__, exc))
        if "thread" in str(exc):
            err = AgentError("resource_exhausted", err.message, {"resource": "pids"})
        return err.body()
    # a bug: report it without a traceback
    return {"code": "internal", "message": "%s: %s" % (type(exc).__name__, exc)}


def _require(args, key, kind, default=None, optional=False):
    value = args.get(key)
    if value is None:  # absent or null: the host sends an operation's unset fields as null
        if optional:
            return None
        value = default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AgentError("invalid_request", "field %r must be %s" % (key, kind.__name__))
    return value


def _number(args, key, default):
    value = args.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise AgentError("invalid_request", "field %r must be a non-negative number" % key)
    return float(value)


def _env(args):
    env = args.get("env")
    if env is None:
        return {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
        for k, v in env.items()
    ):
        raise AgentError("invalid_request", "env must map names to strings")
    return env


# ---------------------------------------------------------------------------- processes


def _children_map():
    """Map pid -> list of child pids, from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid):
    """All descendant pids of ``pid`` (not ``pid`` itself)."""
    children = _children_map()
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kill(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_code(returncode):
    return 128 - returncode if returncode < 0 else returncode


class Capture:
    """Bytes kept up to a cap; later bytes are counted and dropped."""

    def __init__(self, cap):
        self.cap = cap
        self.data = bytearray()
        self.truncated = False

    def add(self, data):
        room = self.cap - len(self.data)
        if len(data) > room:
            self.truncated = True
            data = data[: max(room, 0)]
        self.data += data
        return data


# ---------------------------------------------------------------------------- sessions

_PRELUDE = (
    "trap ':' INT\n"
    "__rock_ret() { return $1; }\n"
    "__rock_rc=0\n"
    "export PAGER=cat GIT_PAGER=cat MANPAGER=cat\n"
)


class Session:
    """A persistent bash; completion is detected with a fresh random nonce per command."""

    def __init__(self, agent, name, env, cwd):
        self.agent = agent
        self.name = name
        self.env = env
        self.cwd = cwd
        self.proc = None
        self.buf = bytearray()
        self.data_event = asyncio.Event()
        self.eof = False
        self.busy = False
        self.stdin_w = None
        self.reader_task = None
        self.interrupted = False
        self.abandoned = False
        self.deadline = None

    async def start(self):
        env = dict(os.environ)
        env.update(self.env)
        env.pop("BASH_ENV", None)
        env.pop("ENV", None)
        bash = _which("bash", env.get("PATH")) or "/bin/bash"
        try:
            self.proc = await asyncio.create_subprocess_exec(
                bash,
                "--noprofile",
                "--norc",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise AgentError("invalid_request", "cannot start bash: %s" % exc) from None
        self.buf = bytearray()
        self.eof = False
        self.reader_task = asyncio.ensure_future(self._read())
        self.proc.stdin.write(_PRELUDE.encode())

    async def _read(self):
        out = self.proc.stdout
        while True:
            data = await out.read(READ_SIZE)
            if not data:
                self.eof = True
                self.data_event.set()
                return
            self.buf += data
            self.data_event.set()

    async def run(self, command, timeout, cap, emit=None):
        if self.busy:
            raise AgentError(
                "session_busy", "a command is already running in session %r" % self.name
            )
        if self.proc is None or self.eof:
            raise AgentError("session_not_found", "session %r has ended" % self.name)
        self.busy = True
        self.interrupted = False
        self.abandoned = False
        self.deadline = None
        task = asyncio.ensure_future(self._run(command, timeout, cap, emit))
        task.add_done_callback(self._done)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # Nobody waits for the result any more: stop the command now and let the task
            # read up to its marker, so the next command's output starts clean.
            self.abandoned = True
            self.deadline = time.monotonic()
            self.data_event.set()
            raise

    def _done(self, task):
        self.busy = False
        if not task.cancelled():
            task.exception()  # retrieved: an abandoned run's error has no reader

    async def _run(self, command, timeout, cap, emit):
        nonce = os.urandom(12).hex()
        marker = re.compile(b"\x1e" + nonce.encode() + b":(-?[0-9]+)\x1e")
        keep = len(nonce) + 16
        r, w, fifo = _stdin_fifo(nonce)
        self.stdin_w = w
        started = time.monotonic()
        script = (
            "IFS= read -r -d '' __rock_cmd <<'R%s'\n%s\nR%s\n"
            "__rock_ret $__rock_rc; eval \"$__rock_cmd\" <'%s'; __rock_rc=$?; "
            "printf '\\036%s:%%d\\036' \"$__rock_rc\"\n"
        ) % (nonce, command.replace("\0", ""), nonce, fifo, nonce)
        self.proc.stdin.write(script.encode("utf-8", "surrogateescape"))
        capture = Capture(cap)
        emitted = 0
        exit_code = None
        timed_out = restarted = False
        self.deadline = None if timeout is None else started + timeout
        stage = 0
        try:
            while True:
                m = marker.search(self.buf)
                if m:
                    exit_code = int(m.group(1))
                    body = self.buf[: m.start()]
                    del self.buf[: m.end()]
                    self._take(body, capture, emit, emitted, final=True)
                    break
                if self.buf:
                    # Hand over everything but a tail that might be the start of the marker.
                    cut = self.buf.rfind(b"\x1e", max(0, len(self.buf) - keep))
                    cut = len(self.buf) if cut < 0 else cut
                    if cut:
                        head = bytes(self.buf[:cut])
                        del self.buf[:cut]
                        emitted = self._take(head, capture, emit, emitted, final=False)
                if self.eof:
                    await self.proc.wait()
                    exit_code = _exit_code(self.proc.returncode)
                    self._take(bytes(self.buf), capture, emit, emitted, final=True)
                    self.buf.clear()
                    break
                self.data_event.clear()
                wait = None if self.deadline is None else max(self.deadline - time.monotonic(), 0)
                if wait is None or wait > 0:
                    try:
                        await asyncio.wait_for(self.data_event.wait(), wait)
                        continue
                    except asyncio.TimeoutError:
                        pass
                # Deadline passed: escalate one stage and wait a grace period for the marker.
                stage += 1
                if stage == 1:
                    timed_out = not self.interrupted and not self.abandoned
                    self._close_stdin()
                    _killpg(self.proc.pid, signal.SIGINT)
                elif stage == 2:
                    _kill(descendants(self.proc.pid), signal.SIGKILL)
                else:
                    restarted = True
                    await self._restart()
                    exit_code = 137
                    self._take(bytes(self.buf), capture, emit, emitted, final=True)
                    break
                self.deadline = time.monotonic() + KILL_GRACE
        finally:
            # w is closed exactly once, by _close_stdin: its number may be reused right after.
            self._close_stdin()
            os.close(r)
            _unlink(fifo)
        ended = self.eof and not restarted
        return {
            "session": self.name,
            "exit_code": exit_code,
            "duration": time.monotonic() - started,
            "timed_out": timed_out,
            "truncated": capture.truncated,
            "session_restarted": restarted,
            "session_ended": ended,
        }, bytes(capture.data)

    def _take(self, data, capture, emit, emitted, final):
        kept = capture.add(data)
        if emit is not None and kept and not self.abandoned:
            emit(kept)
        return emitted + len(kept)

    def _close_stdin(self):
        if self.stdin_w is not None:
            try:
                os.close(self.stdin_w)
            except OSError:
                pass
            self.stdin_w = None

    async def _restart(self):
        await self.kill()
        await self.start()

    def write_stdin(self, data, eof):
        if not self.busy or self.stdin_w is None:
            raise AgentError("conflict", "no command is running in session %r" % self.name)
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.stdin_w, view)
            except BlockingIOError:
                raise AgentError("conflict", "stdin buffer of the command is full") from None
            view = view[n:]
        if eof:
            self._close_stdin()

    def interrupt(self):
        if self.proc is not None:
            self.interrupted = True
            _killpg(self.proc.pid, signal.SIGINT)

    async def kill(self):
        if self.proc is None:
            return
        pid = self.proc.pid
        victims = descendants(pid)
        _killpg(pid, signal.SIGKILL)
        _kill(victims, signal.SIGKILL)
        try:
            self.proc.stdin.close()
        except Exception:
            pass
        await self.proc.wait()
        if self.reader_task is not None:
            await asyncio.gather(self.reader_task, return_exceptions=True)
        self.proc = None


# ---------------------------------------------------------------------------- agent


class Agent:
    """Serves requests from one stream pair."""

    def __init__(self, reader, writer, root="/"):
        self.reader = reader
        self.writer = writer
        self.root = os.path.realpath(root)
        self.sessions = {}
        self.tasks = {}
        self.inputs = {}
        self.ptys = {}
        self.procs = {}  # background processes by pid (proc.* ops)
        self.ports = {}  # request id -> _PortConn (see "ports" below)
        self.closing = False

    # -- output

    def send(self, header, payload=b""):
        if not self.closing or header.get("type") in ("result", "error"):
            try:
                self.writer.write(encode_frame(header, payload))
            except (ConnectionError, RuntimeError):
                pass

    async def flush(self):
        try:
            await self.writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    # -- main loop

    async def serve(self):
        try:
            while True:
                try:
                    frame = await read_frame(self.reader)
                except FrameTooLarge as exc:
                    # Say so, skip its bytes and go on: a request too big must not kill us.
                    self.send(
                        {
                            "id": None,
                            "type": "error",
                            "error": {"code": "too_large", "message": str(exc)},
                        }
                    )
                    await self.flush()
                    if not await _skip(self.reader, exc.size):
                        break
                    continue
                except FrameError as exc:
                    self.send(
                        {
                            "id": None,
                            "type": "error",
                            "error": {"code": "bad_frame", "message": str(exc)},
                        }
                    )
                    break
                if frame is None:
                    break
                self.dispatch(*frame)
        finally:
            await self.shutdown()

    def dispatch(self, header, payload):
        rid = header.get("id")
        kind = header.get("type")
        if kind == "chunk" or kind == "end":
            queue = self.inputs.get(rid)
            if queue is not None:
                queue.put_nowait(payload if kind == "chunk" else None)
            return
        if kind == "ack":  # flow control of a port connection (see "ports" below)
            conn = self.ports.get(rid)
            if conn is not None:
                conn.acked(header.get("n"))
            return
        if kind == "cancel":
            task = self.tasks.get(rid)
            if task is not None:
                task.cancel()
            return
        if not isinstance(rid, int) or isinstance(rid, bool):
            self.send(
                {
                    "id": None,
                    "type": "error",
                    "error": {"code": "bad_frame", "message": "request id must be an integer"},
                }
            )
            return
        op = header.get("op")
        args = header.get("args") or {}
        trace = header.get("trace")
        if not isinstance(trace, str) or not TRACE_ID.match(trace):
            trace = None  # a bad trace id is ignored, never trusted
        if not isinstance(args, dict):
            error = {"code": "invalid_request", "message": "args must be an object"}
            if trace:
                error["trace"] = trace
            self.send({"id": rid, "type": "error", "error": error})
            return
        handler = OPS.get(op) if isinstance(op, str) else None
        if handler is None:
            error = {"code": "unknown_operation", "message": "unknown operation: %r" % (op,)}
            if trace:
                error["trace"] = trace
            self.send({"id": rid, "type": "error", "error": error})
            return
        if header.get("more"):
            queue = asyncio.Queue()
            if payload:
                queue.put_nowait(payload)
            self.inputs[rid] = queue
            payload = queue
        task = asyncio.ensure_future(self.handle(rid, handler, args, payload, op, trace))
        self.tasks[rid] = task

    async def handle(self, rid, handler, args, payload, op=None, trace=None):
        """Run one op and send its result or error.

        A traced op is logged at its start and, before its reply is sent, at its end (so the
        line is written when the host gets the reply); its error reply carries the trace id.
        """
        if trace:
            started = time.monotonic()
            _trace_log({"event": "op.start", "trace": trace, "op": op, "id": rid})
        reply = None
        outcome = "cancelled"
        try:
            result = await handler(self, rid, args, payload)
            data, out = result if isinstance(result, tuple) else (result, b"")
            if len(out) > CHUNK:
                # Bulk output goes ahead as chunks: no frame outgrows MAX_PAYLOAD.
                self.streamer(rid, "data")(out)
                out = b""
            reply, outcome = ({"id": rid, "type": "result", "data": data}, out), "ok"
        except asyncio.CancelledError:
            pass  # the host gave up on it (or the agent is shutting down): nobody waits
        except Exception as exc:
            error = _error_body(exc)
            if trace:
                error["trace"] = trace
            reply, outcome = ({"id": rid, "type": "error", "error": error}, b""), error["code"]
        finally:
            if trace:
                ms = round((time.monotonic() - started) * 1000, 3)
                end = {"event": "op.end", "trace": trace, "op": op, "id": rid, "ms": ms}
                end["outcome"] = outcome
                _trace_log(end)
            if reply is not None:
                self.send(*reply)
            self.tasks.pop(rid, None)
            self.inputs.pop(rid, None)
            await self.flush()

    async def shutdown(self):
        self.closing = True
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*[s.kill() for s in self.sessions.values()], return_exceptions=True)
        self.sessions.clear()
        procs_close(self)
        await self.flush()

    # -- paths

    def path(self, args, key="path"):
        """Resolve a path argument: relative to the agent's cwd, confined to the root."""
        raw = _require(args, key, str)
        if not raw or "\0" in raw:
            raise AgentError("invalid_request", "%s must be a non-empty path" % key)
        full = os.path.abspath(raw)
        if self.root == "/":
            return full
        real = os.path.realpath(full)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise AgentError("path_outside_sandbox", "path %r is outside the sandbox" % raw)
        return real

    def session(self, args):
        name = _require(args, "session", str, "default")
        s = self.sessions.get(name)
        if s is None:
            raise AgentError("session_not_found", "no session named %r" % name)
        return s

    def streamer(self, rid, stream):
        def emit(data):
            for i in range(0, len(data), CHUNK):
                self.send(
                    {"id": rid, "type": "chunk", "stream": stream}, bytes(data[i : i + CHUNK])
                )

        return emit


# ---------------------------------------------------------------------------- operations

OPS = {}  # type: dict[str, Any]


def op(name):
    def register(fn):
        OPS[name] = fn
        return fn

    return register


@op("ping")
async def op_ping(agent, rid, args, payload):
    return {
        "version": VERSION,
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "root": agent.root,
    }


@op("session.create")
async def op_session_create(agent, rid, args, payload):
    name = _require(args, "session", str, "default")
    if not SESSION_NAME.match(name):
        raise AgentError("invalid_request", "bad session name %r" % name)
    if name in agent.sessions:
        raise AgentError("session_exists", "session %r exists already" % name)
    cap = _require(args, "max_sessions", int, DEFAULT_MAX_SESSIONS)
    if len(agent.sessions) >= cap:
        raise AgentError(
            "resource_exhausted",
            "the sandbox has %d sessions, its limit: close one first" % len(agent.sessions),
            {"resource": "sessions", "limit": cap},
        )
    cwd = agent.path(args, "cwd") if args.get("cwd") else None
    if cwd is not None and not os.path.isdir(cwd):
        raise AgentError("file_not_found", "cwd %r is not a directory" % cwd)
    session = Session(agent, name, _env(args), cwd)
    agent.sessions[name] = session
    try:
        await session.start()
        output = bytearray()
        for cmd in _require(args, "startup_commands", list, []):
            if not isinstance(cmd, str):
                raise AgentError("invalid_request", "startup_commands must be strings")
            _, out = await session.run(cmd, DEFAULT_TIMEOUT, DEFAULT_MAX_OUTPUT)
            output += out
    except BaseException:
        agent.sessions.pop(name, None)
        await session.kill()
        raise
    return {"session": name}, bytes(output)


@op("session.run")
async def op_session_run(agent, rid, args, payload):
    session = agent.session(args)
    command = _require(args, "command", str)
    timeout = _number(args, "timeout", DEFAULT_TIMEOUT)
    cap = int(_number(args, "max_output_bytes", DEFAULT_MAX_OUTPUT))
    emit = agent.streamer(rid, "output") if args.get("stream") else None
    result, out = await session.run(command, timeout, cap, emit)
    if result["session_ended"]:
        agent.sessions.pop(session.name, None)
        await session.kill()
    return result, (b"" if emit else out)


@op("session.stdin")
async def op_session_stdin(agent, rid, args, payload):
    agent.session(args).write_stdin(payload, bool(args.get("eof")))
    return {}


@op("session.interrupt")
async def op_session_interrupt(agent, rid, args, payload):
    agent.session(args).interrupt()
    return {}


@op("session.close")
async def op_session_close(agent, rid, args, payload):
    session = agent.session(args)
    agent.sessions.pop(session.name, None)
    await session.kill()
    return {}


@op("session.list")
async def op_session_list(agent, rid, args, payload):
    return {"sessions": sorted(agent.sessions)}


async def _pump(stream, capture, emit):
    while True:
        data = await stream.read(READ_SIZE)
        if not data:
            return
        kept = capture.add(data)
        if emit is not None and kept:
            emit(kept)


def _exec_plan(args):
    """``exec``'s arguments -> (argv, env, timeout, output cap): one home for the asyncio op and
    the fast loop's :class:`_SyncExec`.
    """
    command = args.get("command")
    shell = args.get("shell")
    if isinstance(command, str):
        argv = ["bash", "-c", command] if shell is not False else command.split()
    elif isinstance(command, list) and command and all(isinstance(a, str) for a in command):
        argv = ["bash", "-c", " ".join(command)] if shell else list(command)
    else:
        raise AgentError("invalid_request", "command must be a string or a non-empty argv list")
    timeout = _number(args, "timeout", DEFAULT_TIMEOUT)
    cap = int(_number(args, "max_output_bytes", DEFAULT_MAX_OUTPUT))
    env = dict(os.environ)
    env.update(_env(args))
    if argv[0] == "bash" and _which("bash", env.get("PATH")) is None:
        argv[0] = "/bin/sh"
    return argv, env, timeout, cap


@op("exec")
async def op_exec(agent, rid, args, payload):
    argv, env, timeout, cap = _exec_plan(args)
    cwd = agent.path(args, "cwd") if args.get("cwd") else None
    stream = bool(args.get("stream"))
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if payload else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        return {
            "exit_code": 127,
            "stdout_len": 0,
            "duration": time.monotonic() - started,
            "timed_out": False,
            "truncated": False,
        }, ("%s\n" % exc).encode()
    except OSError as exc:
        raise _os_error(exc) from None
    out, err = Capture(cap), Capture(cap)
    pumps = asyncio.gather(
        _pump(proc.stdout, out, agent.streamer(rid, "stdout") if stream else None),
        _pump(proc.stderr, err, agent.streamer(rid, "stderr") if stream else None),
    )
    if payload:
        proc.stdin.write(payload)

        async def feed():
            try:
                await proc.stdin.drain()
                proc.stdin.close()
            except (ConnectionError, BrokenPipeError):
                pass

        asyncio.ensure_future(feed())
    timed_out = False
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except asyncio.TimeoutError:
        timed_out = True
        _killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    except asyncio.CancelledError:
        _killpg(proc.pid, signal.SIGKILL)
        raise
    # The command is done; a background child may still hold the pipes: take what is there.
    try:
        await asyncio.wait_for(asyncio.shield(pumps), 0.05 if not timed_out else 0.5)
    except asyncio.TimeoutError:
        pumps.cancel()
    result = {
        "exit_code": _exit_code(proc.returncode),
        "stdout_len": 0 if stream else len(out.data),
        "duration": time.monotonic() - started,
        "timed_out": timed_out,
        "truncated": out.truncated or err.truncated,
    }
    return result, (b"" if stream else bytes(out.data) + bytes(err.data))


def _run_in_thread(fn, *args):
    return asyncio.get_event_loop().run_in_executor(None, fn, *args)


def _too_large(what, limit):
    return AgentError("too_large", "%s is over the %d-byte limit of one read" % (what, limit))


@op("file.read")
async def op_file_read(agent, rid, args, payload):
    """A file's bytes; ``max_bytes`` bounds them: a regular file over it is refused at once,
    anything else (a device, a growing file) is cut off by a ``too_large`` error at the bound.
    """
    path = agent.path(args)
    offset = int(_number(args, "offset", 0))
    length = args.get("length")
    length = None if length is None else int(_number(args, "length", 0))
    limit = args.get("max_bytes")
    limit = None if limit is None else int(_number(args, "max_bytes", 0))
    if os.path.isdir(path):
        raise AgentError("is_a_directory", "%s is a directory" % path)
    f = await _run_in_thread(open, path, "rb")
    try:
        st = os.fstat(f.fileno())
        size = st.st_size
        want = max(size - offset, 0)
        if length is not None:
            want = min(want, length)
        if limit is not None and stat_mod.S_ISREG(st.st_mode) and want > limit:
            raise _too_large(path, limit)
        if offset:
            f.seek(offset)
        remaining = length
        first = True
        sent = 0
        while remaining is None or remaining > 0:
            n = CHUNK if remaining is None else min(CHUNK, remaining)
            if limit is not None:
                n = min(n, limit + 1 - sent)  # one byte past the bound tells "over"
            data = await _run_in_thread(f.read, n)
            if not data:
                break
            if limit is not None and sent + len(data) > limit:
                raise _too_large(path, limit)
            if remaining is not None:
                remaining -= len(data)
            sent += len(data)
            if first and len(data) < n:
                # Small file: one frame, no chunk.
                return {"size": size, "length": sent}, data
            first = False
            agent.send({"id": rid, "type": "chunk", "stream": "data"}, data)
            await agent.flush()
        return {"size": size, "length": sent}, b""
    finally:
        f.close()


async def _input_chunks(payload):
    if isinstance(payload, asyncio.Queue):
        while True:
            data = await payload.get()
            if data is None:
                return
            yield data
    elif payload:
        yield payload


@op("file.write")
async def op_file_write(agent, rid, args, payload):
    path = agent.path(args)
    if os.path.isdir(path):
        raise AgentError("is_a_directory", "%s is a directory" % path)
    if args.get("make_parents", True):
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    mode = args.get("mode")
    tmp = "%s.rock-%s.tmp" % (path, os.urandom(4).hex())
    size = 0
    f = await _run_in_thread(open, tmp, "wb")
    try:
        async for data in _input_chunks(payload):
            await _run_in_thread(f.write, data)
            size += len(data)
        f.close()
        if isinstance(mode, int) and not isinstance(mode, bool):
            os.chmod(tmp, mode & 0o7777)
        elif os.path.exists(path):
            os.chmod(tmp, stat_mod.S_IMODE(os.stat(path).st_mode))
        os.replace(tmp, path)
    except BaseException:
        f.close()
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return {"size": size}


def _info(path, name=None):
    st = os.lstat(path)
    if stat_mod.S_ISLNK(st.st_mode):
        kind = "symlink"
    elif stat_mod.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat_mod.S_ISREG(st.st_mode):
        kind = "file"
    else:
        kind = "other"
    return {
        "path": path,
        "name": name if name is not None else os.path.basename(path) or "/",
        "type": kind,
        "size": st.st_size,
        "mode": stat_mod.S_IMODE(st.st_mode),
        "mtime": st.st_mtime,
    }


@op("file.stat")
async def op_file_stat(agent, rid, args, payload):
    return _info(agent.path(args))


@op("file.list")
async def op_file_list(agent, rid, args, payload):
    path = agent.path(args)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise AgentError("not_a_directory", "%s is not a directory" % path)
        raise AgentError("file_not_found", "no such directory: %s" % path)

    def listing():
        out = []
        for name in sorted(os.listdir(path)):
            try:
                out.append(_info(os.path.join(path, name), name))
            except FileNotFoundError:
                pass
        return out

    return {"path": path, "entries": await _run_in_thread(listing)}


@op("file.mkdir")
async def op_file_mkdir(agent, rid, args, payload):
    path = agent.path(args)
    if args.get("parents", True):
        os.makedirs(path, exist_ok=bool(args.get("exist_ok", True)))
    else:
        try:
            os.mkdir(path)
        except FileExistsError:
            if not args.get("exist_ok", True) or not os.path.isdir(path):
                raise
    return {}


@op("file.remove")
async def op_file_remove(agent, rid, args, payload):
    path = agent.path(args)
    if path == agent.root or path == "/":
        raise AgentError("permission_denied", "refusing to remove the sandbox root")
    if not os.path.lexists(path):
        if args.get("missing_ok"):
            return {}
        raise AgentError("file_not_found", "no such file: %s" % path)
    if os.path.isdir(path) and not os.path.islink(path):
        if not args.get("recursive"):
            raise AgentError("is_a_directory", "%s is a directory (use recursive)" % path)
        import shutil

        await _run_in_thread(shutil.rmtree, path)
    else:
        os.unlink(path)
    return {}


class _QueueWriter:
    """File-like object for a worker thread that hands bytes to the event loop."""

    def __init__(self, loop, queue):
        self.loop = loop
        self.queue = queue
        self.buf = bytearray()
        self.stopped = False

    def write(self, data):
        if self.stopped:
            raise OSError(errno.ECANCELED, "the reader stopped")
        self.buf += data
        if len(self.buf) >= CHUNK:
            self._put(bytes(self.buf))
            self.buf.clear()
        return len(data)

    def flush(self):
        pass

    def _put(self, item):
        asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop).result()

    def close(self):
        if self.buf:
            self._put(bytes(self.buf))
            self.buf.clear()


class _QueueReader:
    """File-like object for a worker thread that reads bytes fed by the event loop."""

    def __init__(self, loop, queue):
        self.loop = loop
        self.queue = queue
        self.buf = b""
        self.done = False

    def read(self, n=-1):
        while not self.done and (n < 0 or len(self.buf) < n):
            item = asyncio.run_coroutine_threadsafe(self.queue.get(), self.loop).result()
            if item is None:
                self.done = True
            else:
                self.buf += item
        if n < 0:
            data, self.buf = self.buf, b""
        else:
            data, self.buf = self.buf[:n], self.buf[n:]
        return data


@op("tar.download")
async def op_tar_download(agent, rid, args, payload):
    import tarfile
    import threading

    path = agent.path(args)
    limit = args.get("max_bytes")
    limit = None if limit is None else int(_number(args, "max_bytes", 0))
    if not os.path.exists(path):
        raise AgentError("file_not_found", "no such file or directory: %s" % path)
    loop = asyncio.get_event_loop()
    queue = asyncio.Queue(maxsize=8)
    writer = _QueueWriter(loop, queue)
    errors = []

    def produce():
        try:
            with tarfile.open(fileobj=writer, mode="w|") as tar:
                tar.add(path, arcname="." if os.path.isdir(path) else os.path.basename(path))
            writer.close()
        except BaseException as exc:  # reported by the loop below
            errors.append(exc)
        finally:
            asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    sent = 0
    try:
        while True:
            data = await queue.get()
            if data is None:
                break
            sent += len(data)
            if limit is not None and sent > limit:
                raise AgentError(
                    "too_large", "a tar of %s is over the %d-byte limit of one read" % (path, limit)
                )
            agent.send({"id": rid, "type": "chunk", "stream": "data"}, data)
            await agent.flush()
    finally:
        writer.stopped = True  # the producer stops at its next write
        while not queue.empty():
            queue.get_nowait()
    if errors:
        raise errors[0]
    return {}


def _which(name, path):
    for d in (path or os.defpath).split(os.pathsep):
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _safe_members(tar, dest):
    for member in tar:
        name = member.name
        target = os.path.realpath(os.path.join(dest, name))
        if name.startswith("/") or (target != dest and not target.startswith(dest + os.sep)):
            raise AgentError("path_outside_sandbox", "tar member %r escapes the target" % name)
        if member.islnk() or member.issym():
            link = member.linkname
            base = dest if member.islnk() else os.path.dirname(target)
            resolved = os.path.realpath(os.path.join(base, link))
            if os.path.isabs(link) or (resolved != dest and not resolved.startswith(dest + os.sep)):
                raise AgentError("path_outside_sandbox", "tar link %r escapes the target" % name)
        if member.isdev():
            continue
        member.mode &= 0o7777 & ~0o6000
        yield member


@op("tar.upload")
async def op_tar_upload(agent, rid, args, payload):
    import tarfile

    dest = agent.path(args)
    os.makedirs(dest, exist_ok=True)
    dest = os.path.realpath(dest)
    loop = asyncio.get_event_loop()
    queue = asyncio.Queue(maxsize=8)
    reader = _QueueReader(loop, queue)

    def consume():
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for member in _safe_members(tar, dest):
                tar.extract(member, dest, set_attrs=not member.issym())
        # Drain whatever follows the end-of-archive blocks.
        reader.read()

    future = loop.run_in_executor(None, consume)
    try:
        async for data in _input_chunks(payload):
            if future.done():
                break
            await queue.put(data)
    finally:
        if not future.done():
            await queue.put(None)
    try:
        await future
    except tarfile.TarError as exc:
        raise AgentError("invalid_request", "bad tar stream: %s" % exc) from None
    return {}


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text in ("max", ""):
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def _cgroup_dirs():
    """Map controller -> directory of this process's cgroup ('' for cgroup v2)."""
    dirs = {}
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return dirs
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        for ctrl in controllers.split(",") if controllers else [""]:
            base = "/sys/fs/cgroup/" + ctrl if ctrl else "/sys/fs/cgroup"
            for cand in (base + rel, base):
                if os.path.isdir(cand):
                    dirs[ctrl] = cand
                    break
    return dirs


@op("stats")
async def op_stats(agent, rid, args, payload):
    dirs = _cgroup_dirs()
    out = {"cpu_count": os.cpu_count() or 1, "cgroup": None}
    pids = sum(1 for e in os.listdir("/proc") if e.isdigit())
    if "" in dirs and os.path.exists(os.path.join(dirs[""], "cgroup.controllers")):
        d = dirs[""]
        out["cgroup"] = "v2"
        try:
            with open(os.path.join(d, "cpu.max")) as f:
                quota, period = f.read().split()
            out["cpu_limit"] = None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            pass
        try:
            with open(os.path.join(d, "cpu.stat")) as f:
                for line in f:
                    if line.startswith("usage_usec"):
                        out["cpu_usage_seconds"] = int(line.split()[1]) / 1e6
        except OSError:
            pass
        out["memory_limit_bytes"] = _read_int(os.path.join(d, "memory.max"))
        out["memory_usage_bytes"] = _read_int(os.path.join(d, "memory.current"))
        out["pids_limit"] = _read_int(os.path.join(d, "pids.max"))
        pids = _read_int(os.path.join(d, "pids.current")) or pids
    elif dirs:
        out["cgroup"] = "v1"
        cpu = dirs.get("cpu")
        if cpu:
            quota = _read_int(os.path.join(cpu, "cpu.cfs_quota_us"))
            period = _read_int(os.path.join(cpu, "cpu.cfs_period_us"))
            if quota is not None and quota > 0 and period:
                out["cpu_limit"] = quota / period
        acct = dirs.get("cpuacct")
        if acct:
            usage = _read_int(os.path.join(acct, "cpuacct.usage"))
            if usage is not None:
                out["cpu_usage_seconds"] = usage / 1e9
        mem = dirs.get("memory")
        if mem:
            limit = _read_int(os.path.join(mem, "memory.limit_in_bytes"))
            out["memory_limit_bytes"] = limit if limit is not None and limit < (1 << 60) else None
            out["memory_usage_bytes"] = _read_int(os.path.join(mem, "memory.usage_in_bytes"))
        pd = dirs.get("pids")
        if pd:
            out["pids_limit"] = _read_int(os.path.join(pd, "pids.max"))
            pids = _read_int(os.path.join(pd, "pids.current")) or pids
    out["pids_current"] = pids
    if out.get("cpu_limit"):
        out["cpu_count"] = min(out["cpu_count"], max(1, int(-(-out["cpu_limit"] // 1))))
    return out


# ---------------------------------------------------------------------------- pty

# Run in the child (after setsid): make the pty on stdin the controlling terminal, then exec.
# A tiny interpreter hop instead of preexec_fn, which is unsafe in a process with threads.
_PTY_BOOT = (
    "import os,sys,fcntl,termios\n"
    "fcntl.ioctl(0,termios.TIOCSCTTY,0)\n"
    "try:\n"
    " os.execvpe(sys.argv[1],sys.argv[1:],os.environ)\n"
    "except OSError as e:\n"
    " sys.stderr.write('%s: %s\\r\\n'%(sys.argv[1],e.strerror));os._exit(127)\n"
)
PTY_COMMAND = ["bash", "--noprofile", "--norc", "-i"]


def _winsize(args):
    cols = _require(args, "cols", int, 80)
    rows = _require(args, "rows", int, 24)
    if not (0 < cols < 65536 and 0 < rows < 65536):
        raise AgentError("invalid_request", "cols and rows must be in 1..65535")
    return struct.pack("HHHH", rows, cols, 0, 0)


class Pty:
    """One process on a pseudo-terminal: output is read from the master, input written to it."""

    def __init__(self, master, proc):
        self.master = master
        self.proc = proc

    def resize(self, winsize):
        import fcntl
        import termios

        fcntl.ioctl(self.master, termios.TIOCSWINSZ, winsize)

    async def write(self, data):
        loop = asyncio.get_event_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(self.master, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_writer(self.master)

    async def read(self):
        """Bytes from the terminal; ``b""`` once every holder of the slave side closed it."""
        loop = asyncio.get_event_loop()
        while True:
            try:
                return os.read(self.master, READ_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno == errno.EIO:  # Linux: the slave side is closed
                    return b""
                raise
            ready = loop.create_future()
            loop.add_reader(self.master, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(self.master)

    def kill(self):
        pid = self.proc.pid
        victims = descendants(pid)
        _killpg(pid, signal.SIGKILL)
        _kill(victims, signal.SIGKILL)


@op("pty.open")
async def op_pty_open(agent, rid, args, payload):
    """Run ``command`` on a new pty; input arrives as chunks, output leaves as "pty" chunks.

    The result ``{"exit_code"}`` comes when the process exits; cancel or end of input kills
    its process tree. ``pty.resize`` with ``{"pty": <this request id>}`` resizes it.
    """
    command = args.get("command") or PTY_COMMAND
    if not isinstance(command, list) or not all(isinstance(a, str) and a for a in command):
        raise AgentError("invalid_request", "command must be a non-empty argv list")
    winsize = _winsize(args)
    env = dict(os.environ)
    env.setdefault("TERM", "xterm-256color")
    env.update(_env(args))
    cwd = agent.path(args, "cwd") if args.get("cwd") else None
    if cwd is not None and not os.path.isdir(cwd):
        raise AgentError("file_not_found", "cwd %r is not a directory" % cwd)
    if os.sep not in command[0] and _which(command[0], env.get("PATH")) is None:
        raise AgentError("invalid_request", "command not found: %s" % command[0])
    master, slave = os.openpty()
    try:
        import fcntl
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, winsize)
        proc = await asyncio.create_subprocess_exec(
            sys.executable or "python3",
            "-I",
            "-S",
            "-c",
            _PTY_BOOT,
            *command,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    pty = Pty(master, proc)
    agent.ptys[rid] = pty
    emit = agent.streamer(rid, "pty")

    async def pump_out():
        while True:
            data = await pty.read()
            if not data:
                return
            emit(data)
            await agent.flush()

    async def pump_in():
        async for data in _input_chunks(payload):
            await pty.write(data)
        pty.kill()  # end of input: the client is gone

    reader = asyncio.ensure_future(pump_out())
    writer = asyncio.ensure_future(pump_in())
    try:
        await proc.wait()
        # Output still in the terminal; a background child may keep the slave open: cap it.
        try:
            await asyncio.wait_for(asyncio.shield(reader), 0.5)
        except asyncio.TimeoutError:
            pass
        return {"exit_code": _exit_code(proc.returncode)}
    finally:
        agent.ptys.pop(rid, None)
        pty.kill()
        reader.cancel()
        writer.cancel()
        await asyncio.gather(reader, writer, return_exceptions=True)
        if proc.returncode is None:
            await proc.wait()
        os.close(master)


@op("pty.resize")
async def op_pty_resize(agent, rid, args, payload):
    pty = agent.ptys.get(_require(args, "pty", int))
    if pty is None:
        raise AgentError("not_found", "no pty %r" % args.get("pty"))
    pty.resize(_winsize(args))
    return {}


@op("shutdown")
async def op_shutdown(agent, rid, args, payload):
    await asyncio.gather(*[s.kill() for s in agent.sessions.values()], return_exceptions=True)
    agent.sessions.clear()
    procs_close(agent)
    return {}


# ---------------------------------------------------------------------------- reverse tunnel
# (issue 15.2, reverse direction) A port inside the sandbox whose connections reach a target on
# the node side. ``reverse.listen`` binds 127.0.0.1:PORT in the sandbox's network namespace
# (so it works with network none) and streams one "accept" chunk (payload: the connection id,
# ASCII) per accepted connection; the host claims each with ``reverse.attach`` (``more``: its
# input chunks are bytes for the sandbox side, "end" half-closes it; output chunks "data" are
# the sandbox side's bytes, one empty "eof" chunk when it half-closed). Cancelling the listen
# closes the port and every connection not yet claimed; cancelling an attach closes its socket.

REVERSE_CLAIM_SECONDS = 30.0
REVERSE_BACKLOG = 128
# Flow control, per connection and direction: at most this many bytes sent and not yet
# acknowledged by the other side's write (host -> agent: ``reverse.ack`` requests; agent ->
# host: "ack" chunks whose payload is the byte count). Buffers stay bounded either way.
REVERSE_WINDOW = 512 << 10


@op("reverse.listen")
async def op_reverse_listen(agent, rid, args, payload):
    port = _require(args, "port", int)
    if not 0 <= port <= 65535:
        raise AgentError("invalid_request", "port must be in 0..65535")
    conns = agent.__dict__.setdefault("rev_conns", {})
    counter = agent.__dict__.setdefault("rev_counter", [0])
    emit_accept = agent.streamer(rid, "accept")
    mine = set()
    loop = asyncio.get_running_loop()

    def expire(cid):
        item = conns.pop(cid, None)
        if item is not None:
            item[1].close()

    async def accepted(reader, writer):
        counter[0] += 1
        cid = "%d.%d" % (rid, counter[0])
        conns[cid] = (reader, writer)
        mine.add(cid)
        loop.call_later(REVERSE_CLAIM_SECONDS, expire, cid)
        emit_accept(cid.encode("ascii"))
        await agent.flush()

    try:
        server = await asyncio.start_server(
            accepted, "127.0.0.1", port, backlog=REVERSE_BACKLOG, reuse_address=True
        )
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise AgentError("conflict", "port %d is in use in the sandbox" % port) from None
        raise
    bound = server.sockets[0].getsockname()[1]
    agent.streamer(rid, "listening")(str(bound).encode("ascii"))
    await agent.flush()
    try:
        await asyncio.Event().wait()  # until cancelled (the host closed the tunnel)
    finally:
        server.close()
        for cid in mine:
            expire(cid)
    return {}  # pragma: no cover - only cancellation ends it


@op("reverse.attach")
async def op_reverse_attach(agent, rid, args, payload):
    cid = _require(args, "conn", str)
    item = agent.__dict__.get("rev_conns", {}).pop(cid, None)
    if item is None:
        raise AgentError("not_found", "no pending connection %r" % cid)
    reader, writer = item
    if args.get("reject"):
        writer.close()  # the node could not reach the target, or is at its limit
        return {}
    emit = agent.streamer(rid, "data")
    window = {"credit": REVERSE_WINDOW, "more": asyncio.Event()}
    agent.__dict__.setdefault("rev_windows", {})[rid] = window

    async def pump_out():
        while True:
            while window["credit"] <= 0:
                window["more"].clear()
                await window["more"].wait()
            data = await reader.read(CHUNK)
            if not data:
                agent.send({"id": rid, "type": "chunk", "stream": "eof"})
                await agent.flush()
                return
            window["credit"] -= len(data)
            emit(data)
            await agent.flush()

    async def pump_in():
        if not isinstance(payload, asyncio.Queue):
            return
        async for data in _input_chunks(payload):
            writer.write(data)
            await writer.drain()
            agent.send({"id": rid, "type": "chunk", "stream": "ack"}, b"%d" % len(data))
        if writer.can_write_eof():
            writer.write_eof()

    out = asyncio.ensure_future(pump_out())
    inp = asyncio.ensure_future(pump_in())
    try:
        await asyncio.gather(out, inp)
        return {}
    except (ConnectionError, OSError):
        return {"reset": True}
    finally:
        agent.rev_windows.pop(rid, None)
        out.cancel()
        inp.cancel()
        await asyncio.gather(out, inp, return_exceptions=True)
        writer.close()


@op("reverse.ack")
async def op_reverse_ack(agent, rid, args, payload):
    """The host wrote ``bytes`` of connection ``attach``'s output: that much more may come."""
    window = agent.__dict__.get("rev_windows", {}).get(_require(args, "attach", int))
    if window is not None:
        window["credit"] += _require(args, "bytes", int)
        window["more"].set()
    return {}


# ---------------------------------------------------------------------------- background processes
#
# ``proc.*`` (issue 15.1): commands that run in the background, each in its own process group,
# outliving the request that started them and any client. Their stdout and stderr are kept in
# bounded rings addressed by absolute byte offsets, so a reader resumes where it left off; a
# reader behind the ring's start gets a ``truncated_before`` marker, never silently less.

#: Processes one agent runs at once unless the host asks for another bound (``max_procs``).
DEFAULT_MAX_PROCS = 32
#: Bytes kept per stream of a background process unless ``max_output_bytes`` says otherwise.
PROC_BUFFER = 1 << 20
#: Finished processes kept for status and output; older ones are forgotten first.
KEEP_FINISHED = 64
#: Seconds a finished process's pipes are still read for before it counts as done (a
#: background child of it may hold them open for ever).
PROC_DRAIN = 0.5
PROC_STREAMS = ("stdout", "stderr")


class Ring:
    """The newest ``cap`` bytes of a stream, addressed by absolute offsets."""

    def __init__(self, cap):
        self.cap = cap
        self.buf = bytearray()
        self.start = 0

    @property
    def end(self):
        return self.start + len(self.buf)

    def add(self, data):
        self.buf += data
        over = len(self.buf) - self.cap
        if over > 0:
            del self.buf[:over]
            self.start += over

    def read(self, offset, limit):
        """``(truncated_before or None, offset served, bytes)`` from ``offset`` on."""
        lost = None
        if offset < self.start:
            lost, offset = self.start, self.start
        offset = min(offset, self.end)
        i = offset - self.start
        return lost, offset, bytes(self.buf[i : i + limit])


class BackgroundProcess:
    """One background process, its output rings and its end."""

    def __init__(self, proc, argv, cap):
        loop = asyncio.get_event_loop()
        self.proc = proc
        self.pid = proc.pid
        self.argv = argv
        self.rings = {"stdout": Ring(cap), "stderr": Ring(cap)}
        self.started_at = time.time()
        self.ended_at = None
        self.returncode = None
        self.done = loop.create_future()  # exited and its output read (or given up on)
        self.tick = loop.create_future()  # resolved (and replaced) on new output or the end
        self.pumps = asyncio.gather(
            self._pump(proc.stdout, self.rings["stdout"]),
            self._pump(proc.stderr, self.rings["stderr"]),
        )
        self.task = asyncio.ensure_future(self._run())

    def _notify(self):
        tick, self.tick = self.tick, asyncio.get_event_loop().create_future()
        if not tick.done():
            tick.set_result(None)

    async def _pump(self, stream, ring):
        while True:
            data = await stream.read(READ_SIZE)
            if not data:
                return
            ring.add(data)
            self._notify()

    async def _run(self):
        try:
            await self.proc.wait()
            self.returncode = self.proc.returncode
            self.ended_at = time.time()
            self._close_stdin()
            try:
                await asyncio.wait_for(asyncio.shield(self.pumps), PROC_DRAIN)
            except asyncio.TimeoutError:
                pass  # the pumps go on; followers stop at what is there now
        finally:
            if not self.done.done():
                self.done.set_result(None)
            self._notify()

    def _close_stdin(self):
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            try:
                self.proc.stdin.close()
            except Exception:
                pass

    @property
    def running(self):
        return self.returncode is None

    def info(self):
        rc = self.returncode
        return {
            "pid": self.pid,
            "command": self.argv,
            "running": rc is None,
            "exit_code": None if rc is None else _exit_code(rc),
            "signal": -rc if rc is not None and rc < 0 else None,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "stdout_bytes": self.rings["stdout"].end,
            "stderr_bytes": self.rings["stderr"].end,
            "stdin_open": self.proc.stdin is not None and not self.proc.stdin.is_closing(),
        }

    def signal(self, sig):
        _killpg(self.pid, sig)

    def kill(self):
        """SIGKILL its process group and every descendant (also ones that left the group)."""
        victims = descendants(self.pid) if self.running else []
        _killpg(self.pid, signal.SIGKILL)
        _kill(victims, signal.SIGKILL)

    def close(self, kill=True):
        """Stop tracking it; ``kill`` its group too (only at the agent's end: once it has
        exited, its pid may name another group by now).
        """
        if kill or self.running:
            self.kill()
        self._close_stdin()
        self.pumps.cancel()
        self.task.cancel()


def _proc_argv(args):
    """The argv of ``command``: a string runs under ``bash -c`` (unless ``shell`` is false), a
    list runs as is (joined under ``bash -c`` when ``shell`` is true).
    """
    command = args.get("command")
    shell = args.get("shell")
    if isinstance(command, str) and command:
        return ["bash", "-c", command] if shell is not False else command.split()
    if isinstance(command, list) and command and all(isinstance(a, str) and a for a in command):
        return ["bash", "-c", " ".join(command)] if shell else list(command)
    raise AgentError("invalid_request", "command must be a non-empty string or argv list")


def _os_bytes(text):
    """``text`` for the OS: what came as UTF-8 goes back as it was, anything a JSON string can
    hold (lone surrogates too) becomes some bytes instead of an encoding error.
    """
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _procs_forget(procs):
    finished = sorted((p for p in procs.values() if not p.running), key=lambda p: p.ended_at)
    for p in finished[: max(len(finished) - KEEP_FINISHED, 0)]:
        procs.pop(p.pid, None)
        p.close(kill=False)


def _proc(agent, args):
    pid = _require(args, "pid", int)
    p = agent.procs.get(pid)
    if p is None:
        raise AgentError("process_not_found", "no background process %d" % pid, {"pid": pid})
    return p


def _proc_signal(value):
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= 64:  # real-time signals have no Signals member: the number is fine
            return value
    elif isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, name, None)
        if sig is not None:
            return sig
    raise AgentError("invalid_request", "unknown signal %r" % (value,))


def procs_close(agent):
    """Kill every background process (the agent is ending: so is the sandbox)."""
    for p in agent.procs.values():
        p.close()
    agent.procs.clear()


@op("proc.start")
async def op_proc_start(agent, rid, args, payload):
    """Start ``command`` in the background (own session and process group); its info."""
    argv = _proc_argv(args)
    limit = _require(args, "max_procs", int, DEFAULT_MAX_PROCS)
    cap = _require(args, "max_output_bytes", int, PROC_BUFFER)
    if cap < 1:
        raise AgentError("invalid_request", "max_output_bytes must be positive")
    running = sum(1 for p in agent.procs.values() if p.running)
    if running >= limit:
        raise AgentError(
            "resource_exhausted",
            "the sandbox runs %d background processes, its limit: end one first" % running,
            {"resource": "processes", "limit": limit},
        )
    env = dict(os.environ)
    env.update(_env(args))
    if argv[0] == "bash" and _which("bash", env.get("PATH")) is None:
        argv[0] = "/bin/sh"
    cwd = agent.path(args, "cwd") if args.get("cwd") else None
    if cwd is not None and not os.path.isdir(cwd):
        raise AgentError("file_not_found", "cwd %r is not a directory" % cwd)
    want_stdin = bool(args.get("stdin")) or bool(payload)
    try:
        proc = await asyncio.create_subprocess_exec(
            *[_os_bytes(a) for a in argv],
            stdin=asyncio.subprocess.PIPE if want_stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env={_os_bytes(k): _os_bytes(v) for k, v in env.items()},
            start_new_session=True,
        )
    except FileNotFoundError:
        raise AgentError("file_not_found", "command not found: %s" % argv[0]) from None
    except PermissionError:
        raise AgentError("permission_denied", "cannot execute %s" % argv[0]) from None
    except OSError as exc:
        raise _os_error(exc) from None
    except ValueError as exc:  # a NUL byte in an argument or the environment
        raise AgentError("invalid_request", "cannot start %s: %s" % (argv[0], exc)) from None
    p = BackgroundProcess(proc, argv, cap)
    old = agent.procs.pop(p.pid, None)  # an ended one whose pid was reused
    if old is not None:
        old.close(kill=False)
    agent.procs[p.pid] = p
    _procs_forget(agent.procs)
    if payload:
        proc.stdin.write(payload)
    return p.info()


@op("proc.status")
async def op_proc_status(agent, rid, args, payload):
    return _proc(agent, args).info()


@op("proc.list")
async def op_proc_list(agent, rid, args, payload):
    procs = sorted(agent.procs.values(), key=lambda p: (p.started_at, p.pid))
    return {"processes": [p.info() for p in procs]}


@op("proc.output")
async def op_proc_output(agent, rid, args, payload):
    """A stream's bytes from ``offset`` as chunks: up to ``max_bytes`` of what is there, or
    with ``follow`` everything until the process is done.

    Chunks carry their ``offset``; a chunk with ``truncated_before`` (and no bytes) says the
    bytes before that offset are gone. The result is the process's info plus ``next``, the
    offset to resume from.
    """
    p = _proc(agent, args)
    stream = _require(args, "stream", str, "stdout")
    if stream not in PROC_STREAMS:
        raise AgentError("invalid_request", "stream must be stdout or stderr")
    offset = _require(args, "offset", int, 0)
    if offset < 0:
        raise AgentError("invalid_request", "offset must be >= 0")
    follow = bool(args.get("follow"))
    ring = p.rings[stream]
    budget = None if follow else _require(args, "max_bytes", int, ring.cap)
    pos = offset
    while budget is None or budget > 0:
        tick = p.tick
        finished = p.done.done()
        lost, pos, data = ring.read(pos, CHUNK if budget is None else min(CHUNK, budget))
        if lost is not None:
            agent.send({"id": rid, "type": "chunk", "stream": stream, "truncated_before": lost})
        if data:
            agent.send({"id": rid, "type": "chunk", "stream": stream, "offset": pos}, data)
            pos += len(data)
            if budget is not None:
                budget -= len(data)
            await agent.flush()
            continue
        if finished or not follow:
            break
        await asyncio.wait([tick])
    result = p.info()
    result.update(stream=stream, next=pos)
    return result


@op("proc.input")
async def op_proc_input(agent, rid, args, payload):
    p = _proc(agent, args)
    stdin = p.proc.stdin
    if stdin is None:
        raise AgentError("conflict", "process %d was started without stdin" % p.pid)
    if stdin.is_closing():
        raise AgentError("conflict", "stdin of process %d is closed" % p.pid)
    try:
        if payload:
            stdin.write(payload)
            await stdin.drain()
        if args.get("eof"):
            stdin.close()
    except (BrokenPipeError, ConnectionResetError):
        raise AgentError("conflict", "process %d closed its stdin" % p.pid) from None
    return p.info()


@op("proc.signal")
async def op_proc_signal(agent, rid, args, payload):
    p = _proc(agent, args)
    sig = _proc_signal(args.get("signal", "SIGTERM"))
    if not p.running:
        raise AgentError("conflict", "process %d has exited" % p.pid, {"pid": p.pid})
    if args.get("group", True):
        p.signal(sig)
    else:
        _kill([p.pid], sig)
    return p.info()


@op("proc.kill")
async def op_proc_kill(agent, rid, args, payload):
    """SIGKILL the process's group and descendants; its final info (a no-op once it ended)."""
    p = _proc(agent, args)
    if p.running:
        p.kill()
        await asyncio.shield(p.done)
    return p.info()


@op("proc.wait")
async def op_proc_wait(agent, rid, args, payload):
    p = _proc(agent, args)
    timeout = _number(args, "timeout", None)
    try:
        await asyncio.wait_for(asyncio.shield(p.done), timeout)
    except asyncio.TimeoutError:
        raise AgentError(
            "timeout",
            "process %d still runs after %g s" % (p.pid, timeout),
            {"pid": p.pid},
        ) from None
    return p.info()


# ---------------------------------------------------------------------------- ports
#
# ``port.connect`` relays one TCP connection to 127.0.0.1:PORT in the sandbox's own network
# namespace over the frame channel, so a port is reachable with ``network: none``.
#
# Host -> agent: ``chunk`` frames are bytes for the socket, ``end`` half-closes it (write EOF),
# ``{"type": "ack", "n": k}`` returns k bytes of credit, ``cancel`` resets the connection.
# Agent -> host: a ``chunk`` with ``stream: "open"`` once connected, ``stream: "data"`` chunks
# from the socket, ``stream: "eof"`` when the sandbox side closed its end, and
# ``stream: "ack"`` with ``n`` once n bytes of host input went into the socket. The result
# ``{"sent", "received"}`` comes when both directions are done, or (with ``"reset": true``)
# right after a ``cancel`` reset the connection.
#
# Flow control: each side has at most ``window`` unacknowledged bytes in flight towards the
# other and acks in batches of half a window, so no buffer on either side grows past a window
# per connection, whatever the speed of the reader.

#: Bytes in flight per direction and connection before the sender waits for an ack.
PORT_WINDOW = 1 << 20
#: Port connections one agent holds at once unless the host asks for another bound.
DEFAULT_MAX_PORT_CONNECTIONS = 64
#: Seconds a connect to a port in the sandbox may take (a listener with a full backlog).
PORT_CONNECT_TIMEOUT = 10.0


class _PortConn:
    """Credit towards the host of one relayed connection."""

    def __init__(self, window):
        self.window = window
        self.unacked = 0
        self.credit = asyncio.Event()
        self.credit.set()

    def acked(self, n):
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            self.unacked = max(self.unacked - n, 0)
            if self.unacked < self.window:
                self.credit.set()

    async def spend(self, n):
        while self.unacked >= self.window:
            self.credit.clear()
            await self.credit.wait()
        self.unacked += n


@op("port.connect")
async def op_port_connect(agent, rid, args, payload):
    port = _require(args, "port", int)
    if not 0 < port < 65536:
        raise AgentError("invalid_request", "port must be in 1..65535")
    window = _require(args, "window", int, PORT_WINDOW)
    if window < CHUNK:
        raise AgentError("invalid_request", "window must be at least %d bytes" % CHUNK)
    cap = _require(args, "max_connections", int, DEFAULT_MAX_PORT_CONNECTIONS)
    timeout = _number(args, "connect_timeout", PORT_CONNECT_TIMEOUT)
    if len(agent.ports) >= cap:
        raise AgentError(
            "resource_exhausted",
            "the sandbox has %d port connections open (the limit)" % len(agent.ports),
            {"resource": "port_connections", "limit": cap},
        )
    conn = agent.ports[rid] = _PortConn(window)
    writer = None
    try:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, limit=CHUNK), timeout
            )
        except ConnectionRefusedError:
            raise AgentError(
                "port_closed", "nothing listens on port %d in the sandbox" % port, {"port": port}
            ) from None
        except asyncio.TimeoutError:
            raise AgentError(
                "timeout", "connect to port %d did not finish in %g s" % (port, timeout)
            ) from None
        except OSError as exc:
            raise AgentError(
                "port_closed", "cannot connect to port %d: %s" % (port, exc), {"port": port}
            ) from None
        agent.send({"id": rid, "type": "chunk", "stream": "open"})
        await agent.flush()
        counts = {"sent": 0, "received": 0}

        async def pump_out():
            while True:
                try:
                    data = await reader.read(CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    agent.send({"id": rid, "type": "chunk", "stream": "eof"})
                    await agent.flush()
                    return
                await conn.spend(len(data))
                counts["received"] += len(data)
                agent.send({"id": rid, "type": "chunk", "stream": "data"}, data)
                await agent.flush()

        async def pump_in():
            pending = 0
            try:
                async for data in _input_chunks(payload):
                    writer.write(data)
                    await writer.drain()
                    counts["sent"] += len(data)
                    pending += len(data)
                    if pending >= window // 2:
                        agent.send({"id": rid, "type": "chunk", "stream": "ack", "n": pending})
                        pending = 0
                if writer.can_write_eof():
                    writer.write_eof()
            except (ConnectionError, OSError):
                pass  # the sandbox side reset the connection: the output side ends too

        outgoing = asyncio.ensure_future(pump_out())
        incoming = asyncio.ensure_future(pump_in())
        try:
            await asyncio.gather(outgoing, incoming)
        except asyncio.CancelledError:
            if agent.closing:
                raise
            counts["reset"] = True  # the host's cancel: confirm, so it knows the slot is free
        finally:
            outgoing.cancel()
            incoming.cancel()
            await asyncio.gather(outgoing, incoming, return_exceptions=True)
        return counts
    finally:
        agent.ports.pop(rid, None)
        if writer is not None:
            writer.close()


# ---------------------------------------------------------------------------- entry point


# ---------------------------------------------------------------------------- fast start

# Importing asyncio costs ~45 ms on a small VM: most of a sandbox's create -> first command.
# So the agent starts on a small poll loop of its own (below) that answers ``ping`` and runs
# plain ``exec`` requests one at a time, and hands over to the asyncio agent (importing it
# then) as soon as anything else arrives: another op, a second request while an exec runs,
# a frame it does not like (the asyncio agent reads the same bytes and answers as always),
# or when the host has been quiet for a moment. The frame format and replies are the same.

#: Seconds without a frame after which the fast loop hands over to the asyncio agent.
FAST_IDLE = float(os.environ.get("ROCKLET_FAST_IDLE") or 0.25)


class _SyncWriter:
    """A blocking ``write`` for :meth:`Agent.send` while the fast loop runs."""

    def __init__(self, fd):
        self.fd = fd

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]


def _pidfds():
    """Whether this kernel and Python have pidfds (Linux >= 5.3, Python >= 3.9)."""
    if not hasattr(os, "pidfd_open") or not hasattr(os, "posix_spawn"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


def _fast_exec_ok(args, payload, header):
    """Whether ``exec`` with these arguments can run in the fast loop."""
    return not header.get("more") and not payload and not args.get("stream") and not args.get("cwd")


class _SyncExec:
    """One ``exec`` run without asyncio: as :func:`op_exec` (same argv, limits, result)."""

    def __init__(self, rid, args):
        self.rid = rid
        self.started = time.monotonic()
        argv, env, self.timeout, cap = _exec_plan(args)
        path = argv[0] if "/" in argv[0] else _which(argv[0], env.get("PATH"))
        self.argv, self.env, self.path = argv, env, path
        self.out, self.err = Capture(cap), Capture(cap)
        self.pid = self.pidfd = None
        self.pipes = {}
        self.returncode = None
        self.timed_out = False
        self.cancelled = False
        self.grace_until = None
        self.trace, self.op_started = None, self.started

    def start(self):
        """Spawn the command; False when it is not found (the asyncio path reports that)."""
        if self.path is None or not os.path.isfile(self.path):
            return False
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            self.pid = os.posix_spawn(
                self.path,
                self.argv,
                self.env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
            )
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        self.pipes = {out_r: self.out, err_r: self.err}
        self.pidfd = os.pidfd_open(self.pid)
        self.deadline = self.started + self.timeout
        return True

    def fds(self):
        return [*self.pipes, *([self.pidfd] if self.returncode is None else [])]

    def wait_for(self):
        """Milliseconds until the next deadline (timeout, or the end of the output grace);
        None: none (killed, waiting for its end).
        """
        if self.returncode is None and self.timed_out:
            return None
        until = self.grace_until if self.returncode is not None else self.deadline
        return max(0.0, until - time.monotonic()) * 1000

    def ready(self, fd):
        if fd == self.pidfd:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
            os.close(self.pidfd)
            # A background child may still hold the pipes: take what is there.
            self.grace_until = time.monotonic() + (0.5 if self.timed_out else 0.05)
            return
        data = os.read(fd, READ_SIZE)
        if data:
            self.pipes[fd].add(data)
        else:
            os.close(fd)
            del self.pipes[fd]

    def tick(self):
        """Act on a passed deadline: kill at the timeout, stop reading after the grace."""
        if self.returncode is None:
            if time.monotonic() >= self.deadline and not self.timed_out:
                self.timed_out = True
                _killpg(self.pid, signal.SIGKILL)
        elif time.monotonic() >= self.grace_until:
            for fd in self.pipes:
                os.close(fd)
            self.pipes = {}

    def cancel(self):
        self.cancelled = True
        if self.returncode is None:
            _killpg(self.pid, signal.SIGKILL)

    def done(self):
        return self.returncode is not None and not self.pipes

    def result(self):
        return {
            "exit_code": _exit_code(self.returncode),
            "stdout_len": len(self.out.data),
            "duration": time.monotonic() - self.started,
            "timed_out": self.timed_out,
            "truncated": self.out.truncated or self.err.truncated,
        }, bytes(self.out.data) + bytes(self.err.data)

    def finish(self):
        """Run to the end (in a thread of the asyncio agent after a hand-over)."""
        import select

        while not self.done():
            poller = select.poll()
            for fd in self.fds():
                poller.register(fd, select.POLLIN)
            events = poller.poll(self.wait_for())
            for fd, _ in events:
                self.ready(fd)
            if not events:
                self.tick()
        return self.result()

    async def resume(self, agent, rid, args, payload):
        """The handler of this request once the asyncio agent owns it."""
        outcome = "cancelled"
        try:
            result = await _run_in_thread(self.finish)
            outcome = "ok"
            return result
        except asyncio.CancelledError:
            self.cancel()
            raise
        finally:
            _trace_end(rid, "exec", self.trace, self.op_started, outcome)


def _trace_start(rid, op, trace):
    """As :meth:`Agent.handle`: a traced op's start line; returns its start time."""
    if trace:
        _trace_log({"event": "op.start", "trace": trace, "op": op, "id": rid})
    return time.monotonic()


def _trace_end(rid, op, trace, started, outcome):
    if trace:
        ms = round((time.monotonic() - started) * 1000, 3)
        end = {"event": "op.end", "trace": trace, "op": op, "id": rid, "ms": ms}
        end["outcome"] = outcome
        _trace_log(end)


def _sync_reply(agent, rid, call, op=None, trace=None, started=None):
    """Send the reply of ``call()`` as :meth:`Agent.handle` does (trace lines included;
    ``started``: the op's start line was written already, at that time).
    """
    if started is None:
        started = _trace_start(rid, op, trace)
    try:
        result = call()
        data, out = result if isinstance(result, tuple) else (result, b"")
        if len(out) > CHUNK:
            agent.streamer(rid, "data")(out)
            out = b""
        reply, outcome = ({"id": rid, "type": "result", "data": data}, out), "ok"
    except Exception as exc:
        error = _error_body(exc)
        if trace:
            error["trace"] = trace
        reply, outcome = ({"id": rid, "type": "error", "error": error}, b""), error["code"]
    _trace_end(rid, op, trace, started, outcome)
    agent.send(*reply)


def _ping(agent, rid, args, payload):
    try:
        op_ping(agent, rid, args, payload).send(None)
    except StopIteration as stop:
        return stop.value
    raise AgentError("internal", "ping awaited")  # pragma: no cover


def _fast_serve(agent, out_fd):
    """Serve what needs no asyncio.

    Returns ``(unread bytes, running exec or None, eof)`` for the asyncio agent, or None at
    EOF (done: nothing needs it).
    """
    import select

    if not hasattr(select, "poll"):
        return b"", None, False
    exec_ok = _pidfds()
    # asyncio starts children with close_fds: here every fd but stdio is close-on-exec.
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return b"", None, False
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
    agent.writer = _SyncWriter(out_fd)
    buf = bytearray()
    running = None
    eof = False
    wake = None  # (read end, write end, switch interval) while asyncio imports in a thread
    imported = False
    while True:
        # Whole frames in the buffer first.
        while len(buf) >= HEADER.size:
            head_len, payload_len = HEADER.unpack_from(buf)
            if head_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
                return bytes(buf), running, eof
            end = HEADER.size + head_len + payload_len
            if len(buf) < end:
                break
            try:
                head = bytes(buf[HEADER.size : HEADER.size + head_len])
                header = json.loads(head.decode("utf-8"))
            except ValueError:  # UnicodeDecodeError too
                return bytes(buf), running, eof
            if not isinstance(header, dict):
                return bytes(buf), running, eof
            rid, op_name, kind = header.get("id"), header.get("op"), header.get("type")
            trace = header.get("trace")
            if not isinstance(trace, str) or not TRACE_ID.match(trace):
                trace = None  # as Agent.dispatch: a bad trace id is ignored
            args = header.get("args") or {}
            payload = bytes(buf[HEADER.size + head_len : end])
            if kind == "cancel" and running is not None and rid == running.rid:
                running.cancel()
            elif kind is not None or not isinstance(rid, int) or isinstance(rid, bool):
                return bytes(buf), running, eof
            elif not isinstance(args, dict):
                return bytes(buf), running, eof
            elif op_name == "ping":
                call = lambda r=rid, a=args, p=payload: _ping(agent, r, a, p)  # noqa: E731
                _sync_reply(agent, rid, call, "ping", trace)
            elif (
                op_name == "exec"
                and exec_ok
                and running is None
                and _fast_exec_ok(args, payload, header)
            ):
                job = None
                try:
                    job = _SyncExec(rid, args)
                    if not job.start():
                        return bytes(buf), running, eof  # not found: the asyncio path says so
                    job.trace, job.op_started = trace, _trace_start(rid, "exec", trace)
                    running = job
                except FileNotFoundError as exc:  # as op_exec: the shell's "not found"
                    call = lambda e=exc, j=job: _not_found(e, j.started)  # noqa: E731
                    _sync_reply(agent, rid, call, "exec", trace)
                except (AgentError, OSError) as exc:
                    _sync_reply(agent, rid, lambda e=exc: _raise(e), "exec", trace)
            else:
                return bytes(buf), running, eof
            del buf[:end]
        if running is not None and running.done():
            if running.cancelled:
                _trace_end(running.rid, "exec", running.trace, running.op_started, "cancelled")
            else:
                job = running
                _sync_reply(agent, job.rid, job.result, "exec", job.trace, job.op_started)
            running = None
        if eof:
            if buf:
                return bytes(buf), running, eof  # a truncated frame: the asyncio agent says so
            if running is not None:
                running.cancel()
                running.finish()
                _trace_end(running.rid, "exec", running.trace, running.op_started, "cancelled")
            return None
        if imported and running is None:
            return bytes(buf), None, eof  # asyncio is in: the asyncio agent takes over
        poller = select.poll()
        poller.register(0, select.POLLIN)
        if wake is not None:
            poller.register(wake[0], select.POLLIN)
        if running is not None:
            for fd in running.fds():
                poller.register(fd, select.POLLIN)
        if running is not None:
            wait = running.wait_for()
        else:
            wait = FAST_IDLE * 1000 if wake is None else None
        events = poller.poll(wait)
        if not events:
            if running is None:
                # Quiet: import asyncio in a thread while this loop keeps serving (a request
                # arriving meanwhile does not wait for the import); hand over when it is in.
                wake = _import_in_background()
                if wake is None:
                    return bytes(buf), None, eof  # no thread (pids limit): import it now
                continue
            running.tick()
            continue
        for fd, _ in events:
            if fd == 0:
                data = os.read(0, READ_SIZE)
                if data:
                    buf += data
                else:
                    eof = True
            elif wake is not None and fd == wake[0]:
                for end in wake[:2]:
                    os.close(end)
                sys.setswitchinterval(wake[2])
                wake, imported = None, True
            elif running is not None:
                running.ready(fd)


def _import_in_background():
    """Start importing asyncio in a thread; ``(read end, write end, old switch interval)`` of
    the pipe it writes to when done, or None when no thread can start.
    """
    try:
        import threading

        r, w = os.pipe()
    except (ImportError, OSError):
        return None

    def run():
        try:
            import asyncio  # noqa: F401
        except BaseException:
            pass  # the hand-over imports it again and reports what fails
        finally:
            os.write(w, b"x")

    try:
        threading.Thread(target=run, name="rocklet-import", daemon=True).start()
    except RuntimeError:  # can't start new thread: at the pids limit
        os.close(r)
        os.close(w)
        return None
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.001)  # the serving loop gets the GIL back within 1 ms
    return r, w, old


def _raise(exc):
    raise exc


def _not_found(exc, started):
    return {
        "exit_code": 127,
        "stdout_len": 0,
        "duration": time.monotonic() - started,
        "timed_out": False,
        "truncated": False,
    }, ("%s\n" % exc).encode()


async def amain(root, out_fd=None, agent=None, pending=b"", running=None, eof=False):
    """Serve the agent on this process's stdin/stdout until EOF.

    After a fast start: its ``pending`` bytes first, its ``running`` exec as a request.
    """
    if out_fd is None:
        # stdout belongs to the framing: anything else printing must go to stderr.
        out_fd = os.dup(1)
        os.dup2(2, 1)
    _thread_free_child_watcher()
    reader, writer = await _stdio_on(out_fd, pending, eof)
    if agent is None:
        agent = Agent(reader, writer, root)
    agent.reader, agent.writer = reader, writer
    if running is not None:
        task = asyncio.ensure_future(agent.handle(running.rid, running.resume, {}, b""))
        agent.tasks[running.rid] = task
    await agent.serve()


def _thread_free_child_watcher():
    """Before 3.12, asyncio waits for each child in a thread of its own: under a pids limit
    every session then costs two pids, and a thread that cannot start leaks the child. A
    pidfd watcher (Linux >= 5.3; 3.12 picks it by itself) needs no thread.
    """
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_event_loop())
    asyncio.set_child_watcher(watcher)


async def _stdio_on(out_fd, pending=b"", eof=False):
    loop = asyncio.get_event_loop()
    reader = asyncio.StreamReader(limit=MAX_PAYLOAD + MAX_HEADER)
    if pending:
        reader.feed_data(pending)  # read by the fast start, not served there
    if eof:
        reader.feed_eof()
    else:
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0)
        )
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out_fd, "wb", 0)
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, writer


def _stdin_fifo(nonce):
    """A FIFO for one session command's stdin: ``(read end, write end, path)``.

    The rocklet is not dumpable, so its sessions cannot open ``/proc/<rocklet>/fd/N``; the
    read end stays open here until the command ends (so the open never blocks), and closing
    the write end gives the command EOF.
    """
    base = os.path.join(os.environ.get("TMPDIR") or "/tmp", ".rocklet-%d" % os.getpid())
    path = os.path.join(base, nonce)
    try:
        os.mkfifo(path, 0o600)
    except FileNotFoundError:
        os.makedirs(base, 0o700, exist_ok=True)
        os.mkfifo(path, 0o600)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    return r, os.open(path, os.O_WRONLY), path


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _not_dumpable():
    """PR_SET_DUMPABLE 0: sandbox code without CAP_SYS_PTRACE cannot ptrace the rocklet or
    read its /proc/PID/mem (children it starts are dumpable again after their exec).
    """
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE
    except Exception:  # not Linux, or no ctypes in this Python: nothing to protect with
        pass


def _load_seccomp(path):
    """Load the BPF program in ``path`` (``struct sock_filter`` array) as this process's
    seccomp filter, after no-new-privs; every process it starts inherits both. For runtimes
    whose sandbox processes do not get a filter from outside (runsc 2022 filters only a
    container's init, and the rocklet runs in an exec).
    """
    import ctypes

    with open(path, "rb") as f:
        data = f.read()
    if not data or len(data) % 8:
        raise OSError("%s is not a BPF program" % path)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(data, len(data))
    prog = SockFprog(len(data) // 8, ctypes.cast(buf, ctypes.c_char_p))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP failed")


def main(argv=None):
    """Command-line entry: ``python3 agent.py [--root DIR] [--seccomp BPF_FILE]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    root, seccomp = "/", None
    while len(argv) >= 2 and argv[0] in ("--root", "--seccomp"):
        if argv[0] == "--seccomp":
            seccomp = argv[1]
            del argv[:2]
            continue
        root = os.path.realpath(argv[1])
        del argv[:2]
        if not os.path.isdir(root):
            sys.stderr.write("rocklet: --root %s is not a directory\n" % root)
            return 2
        cwd = os.path.realpath(os.getcwd())
        if cwd != root and not cwd.startswith(root.rstrip(os.sep) + os.sep):
            os.chdir(root)
    if argv:
        sys.stderr.write("usage: agent.py [--root DIR] [--seccomp BPF_FILE]\n")
        return 2
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    # A platform started in the background (`cmd &` from a script, nohup) hands its children
    # SIGINT/SIGQUIT ignored, and an ignored signal stays ignored across exec: the sandbox's
    # shells and programs would never see ^C or an interrupt. Start them from the defaults.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    _not_dumpable()
    if seccomp is not None:
        try:
            _load_seccomp(seccomp)
        except (OSError, AttributeError) as exc:  # fail closed: no rocklet without its filter
            sys.stderr.write("rocklet: cannot load the seccomp filter %s: %s\n" % (seccomp, exc))
            return 2
    try:
        # stdout belongs to the framing: anything else printing must go to stderr.
        out_fd = os.dup(1)
        os.dup2(2, 1)
        agent = Agent(None, None, root)
        switch = sys.getswitchinterval()
        state = _fast_serve(agent, out_fd)
        sys.setswitchinterval(switch)
        if state is not None:
            asyncio.run(amain(root, out_fd, agent, *state))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
