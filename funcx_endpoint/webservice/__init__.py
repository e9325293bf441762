"""The private funcX web service (``funcx-service``).

A funcX 1.0 compatible web service for one machine or a small site: the REST
API v2 (:mod:`~funcx_endpoint.webservice.api`) and the Globus Auth calls
funcX clients make (:mod:`~funcx_endpoint.webservice.auth`) over HTTPS;
storage in SQLite or PostgreSQL (:mod:`~funcx_endpoint.webservice.storage`);
tasks and results through RabbitMQ (:mod:`~funcx_endpoint.webservice.broker`,
:mod:`~funcx_endpoint.webservice.dispatch`), with a broker user per endpoint
provisioned through the management API
(:mod:`~funcx_endpoint.webservice.management`).  The process and its parts:
:mod:`~funcx_endpoint.webservice.service`; the command line:
:mod:`~funcx_endpoint.webservice.cli`.
"""
