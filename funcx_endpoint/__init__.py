"""funcx-endpoint: a funcX endpoint built on Twisted.

The endpoint daemon takes tasks from RabbitMQ, runs them in supervised manager and
worker processes and publishes the results back to the funcX web service.
"""

from funcx_endpoint.version import __version__

__all__ = ["__version__"]
