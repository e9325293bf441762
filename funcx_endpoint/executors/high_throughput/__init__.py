"""funcX 1.0 import path: ``funcx_endpoint.executors.high_throughput.executor``."""
