"""Wire models of the direct data plane (see ``deployments/_dataplane.py``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DataPlaneGrant"]


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
