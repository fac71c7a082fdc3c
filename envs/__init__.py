"""rock_serve.envs (see ARCHITECTURE.md)."""
