"""The one error body."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from rock_serve.protocol._base import WireModel


class ErrorDetail(WireModel):
    """What went wrong, in the one shape every endpoint uses."""

    code: str = Field(description="Machine-readable error code from rock_serve.errors.ErrorCode.")
    message: str = Field(description="Human-readable explanation; never a traceback.")
    retry_after: float | None = Field(
        default=None, description="Seconds to wait before retrying (set on 429 and 503)."
    )
    details: dict[str, Any] | None = Field(
        default=None, description="Extra structured facts, e.g. a failed sandbox's reason."
    )


class ErrorBody(WireModel):
    """The body of every error response: ``{"error": {"code", "message"}}``."""

    error: ErrorDetail = Field(description="The error.")
