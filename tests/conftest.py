"""Session-wide test settings."""

import os

# Never join another Ray cluster or start in token mode by accident.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
