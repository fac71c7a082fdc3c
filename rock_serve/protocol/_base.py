"""Shared base for wire models."""

from __future__ import annotations

import base64
from typing import Literal

from pydantic import BaseModel, ConfigDict

Encoding = Literal["utf-8", "base64"]


class WireModel(BaseModel):
    """Base of every wire model: unknown fields are refused, docstrings reach the schema."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


def encode_bytes(*parts: bytes) -> tuple[list[str], Encoding]:
    """Encode byte strings for JSON: UTF-8 text when all parts decode, else base64 for all."""
    try:
        return [p.decode("utf-8") for p in parts], "utf-8"
    except UnicodeDecodeError:
        return [base64.b64encode(p).decode("ascii") for p in parts], "base64"


def decode_text(text: str, encoding: Encoding) -> bytes:
    """Inverse of :func:`encode_bytes` for one part."""
    return base64.b64decode(text) if encoding == "base64" else text.encode("utf-8")
