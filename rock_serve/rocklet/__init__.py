"""rocklet: the in-sandbox agent and the host-side handle to it."""

from rock_serve.rocklet.handle import AGENT_PATH, RockletHandle

__all__ = ["AGENT_PATH", "RockletHandle"]
