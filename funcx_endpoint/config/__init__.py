"""Endpoint configuration: the classes ``config.py`` uses, and its loader.

A ``config.py`` reads::

    from funcx_endpoint.config import Config, HighThroughputExecutor, LocalProvider

    config = Config(executors=[HighThroughputExecutor(provider=LocalProvider())])
"""

from funcx_endpoint.config.loader import ConfigFileError, load_config, load_runnable_config
from funcx_endpoint.config.model import (
    DEFAULT_SERVICE_ADDRESS,
    Config,
    ConfigError,
    HighThroughputExecutor,
    LocalProvider,
    SimpleStrategy,
)

__all__ = [
    "DEFAULT_SERVICE_ADDRESS",
    "Config",
    "ConfigError",
    "ConfigFileError",
    "HighThroughputExecutor",
    "LocalProvider",
    "SimpleStrategy",
    "load_config",
    "load_runnable_config",
]
