"""The web portal of the private funcX web service.

Served by ``funcx-service`` itself, under ``/portal/`` of its HTTPS site: a
person signs in with the identities the service knows, sees the endpoints,
functions and tasks they own, and sends functions to their endpoints.  See
:mod:`funcx_endpoint.portal.pages` (the pages), :mod:`~funcx_endpoint.portal.web`
(sessions, CSRF and security headers on ``twisted.web``),
:mod:`~funcx_endpoint.portal.live` (server-sent events) and ``docs/portal.rst``.
"""
