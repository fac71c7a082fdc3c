"""rock_serve.sdk (see ARCHITECTURE.md)."""
