"""File operations inside a sandbox."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rock_serve.protocol._base import Encoding, WireModel

PATH = Field(min_length=1, max_length=4096, description="Path inside the sandbox.")


class FileInfo(WireModel):
    """One directory entry or stat result."""

    path: str = Field(description="Absolute path inside the sandbox.")
    name: str = Field(description="Base name.")
    type: Literal["file", "dir", "symlink", "other"] = Field(description="Kind of entry.")
    size: int = Field(description="Size in bytes.")
    mode: int = Field(description="Permission bits.")
    mtime: float = Field(description="Modification time, seconds since the epoch.")


class ReadFileRequest(WireModel):
    """Read (part of) a file."""

    path: str = PATH
    offset: int = Field(default=0, ge=0, description="Start at this byte.")
    length: int | None = Field(default=None, ge=0, description="Read at most this many bytes.")


class WriteFileRequest(WireModel):
    """Write a whole file (for large or binary files use the binary routes)."""

    path: str = PATH
    content: str = Field(description="File content (see encoding).")
    encoding: Encoding = Field(default="utf-8", description="'base64' for binary content.")
    mode: int | None = Field(default=None, ge=0, le=0o7777, description="Permission bits.")
    make_parents: bool = Field(default=True, description="Create missing parent directories.")


class MkdirRequest(WireModel):
    """Create a directory."""

    path: str = PATH
    parents: bool = Field(default=True, description="Create missing parents.")
    exist_ok: bool = Field(default=True, description="No error if it exists.")


class RemoveRequest(WireModel):
    """Remove a file or directory."""

    path: str = PATH
    recursive: bool = Field(default=False, description="Remove directories and their contents.")
    missing_ok: bool = Field(default=False, description="No error if it does not exist.")


class ListDirResult(WireModel):
    """Entries of a directory, sorted by name."""

    path: str = Field(description="The directory listed.")
    entries: list[FileInfo] = Field(description="Its entries.")
