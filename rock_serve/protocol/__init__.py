"""Wire models: everything that crosses a process boundary."""

from rock_serve.protocol._base import Encoding, WireModel, decode_text, encode_bytes
from rock_serve.protocol.commands import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    ExecRequest,
    ExecResult,
    OutputChunk,
    SessionCloseRequest,
    SessionCreateRequest,
    SessionCreateResponse,
    SessionInterruptRequest,
    SessionRunRequest,
    SessionRunResult,
    SessionStdinRequest,
)
from rock_serve.protocol.common import ErrorBody, ErrorDetail
from rock_serve.protocol.files import (
    FileInfo,
    ListDirResult,
    MkdirRequest,
    ReadFileRequest,
    RemoveRequest,
    WriteFileRequest,
)
from rock_serve.protocol.sandbox import (
    FailureReason,
    Resources,
    SandboxInfo,
    SandboxSpec,
    SandboxState,
    SandboxStats,
)

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_TIMEOUT",
    "Encoding",
    "ErrorBody",
    "ErrorDetail",
    "ExecRequest",
    "ExecResult",
    "FailureReason",
    "FileInfo",
    "ListDirResult",
    "MkdirRequest",
    "OutputChunk",
    "ReadFileRequest",
    "RemoveRequest",
    "Resources",
    "SandboxInfo",
    "SandboxSpec",
    "SandboxState",
    "SandboxStats",
    "SessionCloseRequest",
    "SessionCreateRequest",
    "SessionCreateResponse",
    "SessionInterruptRequest",
    "SessionRunRequest",
    "SessionRunResult",
    "SessionStdinRequest",
    "WireModel",
    "WriteFileRequest",
    "decode_text",
    "encode_bytes",
]
