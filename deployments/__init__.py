"""rock_serve.deployments (see ARCHITECTURE.md)."""
