"""Bodies of the fork routes (issue 16): ``POST /v1/sandboxes/{id}/fork``.

A fork makes ``count`` children whose files are the parent's at the fork point (copy-on-write
over one frozen copy of the parent's writable layer), on the parent's node and in its
namespace. Children inherit the parent's image, resources, network, env and labels; the
fields set here override them. Each child starts in the working directory of the parent's
``default`` session with that session's exported environment (processes are not cloned).
"""

from __future__ import annotations

from pydantic import Field

from rock_serve.protocol._base import WireModel
from rock_serve.protocol.api import SandboxRecord

__all__ = ["MAX_FORK_COUNT", "ForkRequest", "ForkResult"]

#: The most children one fork call makes.
MAX_FORK_COUNT = 64


class ForkRequest(WireModel):
    """Fork a running sandbox into ``count`` children."""

    count: int = Field(default=1, ge=1, le=MAX_FORK_COUNT, description="How many children.")
    env: dict[str, str] | None = Field(
        default=None, description="Variables set on top of the inherited environment."
    )
    labels: dict[str, str] | None = Field(
        default=None, description="Labels of the children (default: the parent's)."
    )
    owner: str | None = Field(
        default=None, max_length=256, description="Owner of the children (default: the parent's)."
    )
    ttl_seconds: float | None = Field(
        default=None,
        gt=0,
        le=7 * 86_400,  # as on create
        description="Hard deadline of each child (default: the platform's).",
    )
    lease_seconds: float | None = Field(
        default=None,
        gt=0,
        le=86_400,  # as on create
        description="Lease of each child (default: the parent's).",
    )
    session: bool = Field(
        default=True,
        description="Start each child in the cwd and exported env of the parent's 'default' "
        "session (when it has one).",
    )


class ForkResult(WireModel):
    """The children of one fork, in creation order."""

    parent: str = Field(description="The forked sandbox.")
    items: list[SandboxRecord] = Field(description="The children's records.")
