"""rocklet: the in-sandbox agent and the host-side handle to it."""

from rock_serve.rocklet.handle import AGENT_PATH, RockletHandle, agent_argv, install_agent

__all__ = ["AGENT_PATH", "RockletHandle", "agent_argv", "install_agent"]
