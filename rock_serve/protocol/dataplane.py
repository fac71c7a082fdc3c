"""Wire models of the direct data plane (see ``deployments/_dataplane.py``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rock_serve.protocol.commands import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    SESSION_NAME,
    SessionRunResult,
)
from rock_serve.protocol.ops import SessionRunOp

__all__ = [
    "MAX_BATCH",
    "BatchRunItem",
    "BatchRunOutcome",
    "BatchRunReply",
    "BatchRunRequest",
    "DataPlaneGrant",
]


#: The most commands one batch carries (over HTTP and over Ray).
MAX_BATCH = 4096


class DataPlaneGrant(BaseModel):
    """Where and with what token a client may reach one sandbox's node directly.

    ``POST /v1/sandboxes/{id}/dataplane`` answers it. The client sends the sandbox's data-plane
    calls (exec, sessions, files, stats) to ``endpoint`` with the same paths and bodies as REST
    v1 and ``Authorization: Bearer <token>``; the token is good for this sandbox only, until
    ``expires_at``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sandbox_id: str = Field(description="The sandbox the token is for.")
    endpoint: str = Field(description="Base URL of the node's data-plane server.")
    token: str = Field(description="Short-lived bearer token scoped to this sandbox.")
    expires_at: float = Field(description="When the token expires (unix seconds).")


class BatchRunItem(BaseModel):
    """One command of a batch: run in one sandbox's session, with that sandbox's token."""

    model_config = ConfigDict(extra="forbid")

    sandbox_id: str = Field(description="The sandbox.")
    token: str = Field(description="Its data-plane token (from its grant).")
    session: str = Field(default="default", pattern=SESSION_NAME, description="Session name.")
    command: str = Field(description="Bash source.")
    timeout: float | None = Field(default=DEFAULT_TIMEOUT, gt=0, description="Seconds.")
    max_output_bytes: int = Field(default=DEFAULT_MAX_OUTPUT, ge=0, description="Output cap.")

    def op(self) -> SessionRunOp:
        """The session run this item asks for."""
        return SessionRunOp(
            session=self.session,
            command=self.command,
            timeout=self.timeout,
            max_output_bytes=self.max_output_bytes,
        )


class BatchRunRequest(BaseModel):
    """``POST /v1/dataplane/batch`` on a node: one command in each of many sandboxes (a GRPO
    group's step) in one request; they run concurrently.
    """

    model_config = ConfigDict(extra="forbid")

    items: list[BatchRunItem] = Field(max_length=MAX_BATCH, description="The commands.")


class BatchRunOutcome(BaseModel):
    """The result of one item, or its error body (``{"code", "message", ...}``)."""

    model_config = ConfigDict(extra="forbid")

    result: SessionRunResult | None = None
    error: dict[str, Any] | None = None


class BatchRunReply(BaseModel):
    """The outcomes, in the order of the items."""

    model_config = ConfigDict(extra="forbid")

    outcomes: list[BatchRunOutcome]
