"""Session-wide test settings."""

import os

# Never join another Ray cluster or start in token mode by accident.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Serve's proxy must answer its ready check in 5 s and its health checks in 10 s, or the
# controller kills it: on 2 CPU-starved cores (a busy CI machine) a proxy that was starting
# died that way and took the platform fixture with it (ActorDiedError: ProxyActor). Ray's
# processes (heads started here and `ray start` heads of tests/e2e/_head.py) inherit these.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
