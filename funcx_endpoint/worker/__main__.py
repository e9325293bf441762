"""``python -m funcx_endpoint.worker``: the same as ``funcx-worker``."""

from funcx_endpoint.worker.main import main

main()
