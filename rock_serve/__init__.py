"""rock-serve: a self-hosted sandbox platform for agentic RL, built on Ray Serve."""

__version__ = "0.1.0"

__all__ = ["__version__"]
