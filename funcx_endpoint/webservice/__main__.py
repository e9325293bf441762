"""``python -m funcx_endpoint.webservice`` runs ``funcx-service``."""

from funcx_endpoint.webservice.cli import main

main()
