"""``python -m funcx_endpoint.cli`` runs ``funcx-endpoint``."""

from funcx_endpoint.cli.main import main

main()
