"""A trainer that holds sandboxes and never lets go; `test_chaos.py` kills it with SIGKILL.

Usage: python trainer.py http URL N LEASE OWNER   (HTTP SDK; leases renewed by heartbeats)
       python trainer.py ray GCS_ADDRESS N NAMESPACE OWNER   (Ray transport; owned by its job)
Prints ``READY <id> <id> ...`` once every sandbox is made, then waits to be killed.
"""

from __future__ import annotations

import contextlib
import sys
import threading

from rock_serve.sdk import Client


def main(argv: list[str]) -> None:
    mode, where, n = argv[0], argv[1], int(argv[2])
    with contextlib.ExitStack() as stack:
        if mode == "http":
            lease, owner = float(argv[3]), argv[4]
            client = stack.enter_context(Client(base_url=where))
            spec = {"lease_seconds": lease, "owner": owner}
        else:
            import ray

            ray.init(address=where, log_to_driver=False)
            client = Client.from_ray(namespace=argv[3])
            spec = {"lease_seconds": 3600, "owner": argv[4]}
        boxes = [stack.enter_context(client.sandbox(**spec)) for _ in range(n)]
        print("READY", *(b.id for b in boxes), flush=True)
        threading.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    main(sys.argv[1:])
