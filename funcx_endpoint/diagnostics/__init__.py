"""``funcx-endpoint diagnose``: checks of what an endpoint needs, and a redacted bundle.

:mod:`~funcx_endpoint.diagnostics.checks` holds the checks (local ones are
plain functions; network ones are coroutines on the reactor, each with a
timeout); :mod:`~funcx_endpoint.diagnostics.bundle` packs what a bug report
needs with every secret redacted.
"""
