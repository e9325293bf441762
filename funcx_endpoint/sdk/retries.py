"""When the SDK's requests are retried: globus-sdk retry checks.

globus-sdk retries a request up to 5 times on network errors and on
429/500/502/503/504, and once after refreshing the token on 401.  That is
right for every call but ``POST /submit``: a retried submit whose first try
reached the service makes the tasks twice (funcX 1.0 did that).  So submits
are retried only when the service cannot have acted on them: the connection
was never made (refused, DNS, connect timeout, TLS handshake), or the answer
was 401 (token refreshed first), 429 or 503 (the service promises that these
mean "nothing was created, come back later").  A 500/502/504 or a read
timeout after sending is raised at once: the caller learns that the tasks
may or may not exist, instead of silently getting duplicates.  A
client-generated ``task_group_id`` is sent with every submit too, so the
tasks of a doubtful submit can be found with
:meth:`~funcx_endpoint.sdk.client.FuncXClient.get_taskgroup_tasks`.
Certificate verification failures are never retried (retrying cannot help).
"""

from __future__ import annotations

import ssl
from typing import Any, Iterator, List, Optional
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from globus_sdk.transport import RetryCheckResult, RetryContext

__all__ = ["RETRY_CHECKS", "submit_retry_check", "tls_verification_retry_check"]

# Statuses on which a submit is retried (after a token refresh for 401): the
# service cannot have created anything.
_SUBMIT_RETRY_STATUSES = frozenset({401, 429, 503})


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it wraps (args, ``reason``, cause, context)."""
    seen = set()
    stack: List[BaseException] = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked: List[Any] = [
            *current.args,
            getattr(current, "reason", None),
            current.__cause__,
            current.__context__,
        ]
        stack.extend(item for item in linked if isinstance(item, BaseException))


def _never_reached_server(error: BaseException) -> bool:
    """Whether ``error`` happened before the request could reach the server."""
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return True
    return any(
        isinstance(
            cause,
            (
                urllib3.exceptions.NewConnectionError,
                urllib3.exceptions.ConnectTimeoutError,
                ssl.SSLError,
            ),
        )
        for cause in _causes(error)
    )


def _sent_request(ctx: RetryContext) -> Optional[requests.PreparedRequest]:
    if ctx.response is not None:
        return ctx.response.request
    request = getattr(ctx.exception, "request", None)
    return request if isinstance(request, requests.PreparedRequest) else None


def submit_retry_check(ctx: RetryContext) -> RetryCheckResult:
    """globus-sdk retry check: retry ``POST .../submit`` only when nothing was made.

    Runs before globus-sdk's default checks.  For any other request it has no
    opinion.  For a submit it lets the defaults decide (which retry) only on
    401, 429 and 503 answers and on errors before the request reached the
    server; everything else is not retried.
    """
    request = _sent_request(ctx)
    if request is None or request.method != "POST":
        return RetryCheckResult.no_decision
    if not urlsplit(request.url or "").path.rstrip("/").endswith("/submit"):
        return RetryCheckResult.no_decision
    if ctx.response is not None:
        if ctx.response.status_code in _SUBMIT_RETRY_STATUSES:
            return RetryCheckResult.no_decision
        return RetryCheckResult.do_not_retry
    if ctx.exception is not None and _never_reached_server(ctx.exception):
        return RetryCheckResult.no_decision
    return RetryCheckResult.do_not_retry


def tls_verification_retry_check(ctx: RetryContext) -> RetryCheckResult:
    """globus-sdk retry check: never retry a certificate verification failure."""
    if ctx.exception is not None and any(
        isinstance(cause, ssl.SSLCertVerificationError) for cause in _causes(ctx.exception)
    ):
        return RetryCheckResult.do_not_retry
    return RetryCheckResult.no_decision


#: The checks a funcX client registers before globus-sdk's own.
RETRY_CHECKS = (tls_verification_retry_check, submit_retry_check)
