"""``python -m funcx_endpoint.manager``: the same as ``funcx-manager``."""

from funcx_endpoint.manager.main import main

main()
