"""funcX 1.0 import path: ``funcx_endpoint.endpoint.utils.config``."""
