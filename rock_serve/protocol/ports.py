"""Wire models of relayed ports (``/v1/sandboxes/{id}/ports/{port}/...``, issue 15.2).

The HTTP and WebSocket proxy routes carry the sandbox server's own bodies; only the raw TCP
tunnel (``/v1/sandboxes/{id}/ports/{port}/tcp``, a WebSocket) has messages of ours: binary
frames are bytes both ways, and these text frames.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rock_serve.protocol._base import WireModel

__all__ = ["TUNNEL_EOF", "PortTunnelOpen"]

#: Client -> server text frame: half-close (the sandbox's server reads EOF).
TUNNEL_EOF = "eof"


class PortTunnelOpen(WireModel):
    """Server -> client text frame, first on the tunnel: the port in the sandbox accepted the
    connection (an error body and a close come instead when it did not).
    """

    type: Literal["open"] = Field(default="open", description="Message kind.")
    port: int = Field(ge=1, le=65535, description="The port connected to in the sandbox.")
