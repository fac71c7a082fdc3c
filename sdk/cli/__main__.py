"""``python -m rock_serve.sdk.cli`` is ``rock``."""

from rock_serve.sdk.cli import main

main()
