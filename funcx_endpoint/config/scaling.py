"""The config classes of scaling: :class:`LocalProvider` (blocks of managers
as processes on this machine) and :class:`SimpleStrategy` (funcX's scaling
strategy).  :mod:`funcx_endpoint.config.model` re-exports both, and
``funcx_endpoint.config`` does too.
"""

from __future__ import annotations

from typing import Any

from funcx_endpoint.config import funcx10
from funcx_endpoint.config.bounds import local_managers_problem
from funcx_endpoint.config.fields import ConfigError, ConfigObject, Field, number, string

__all__ = ["LocalProvider", "SimpleStrategy"]


class LocalProvider(ConfigObject):
    """Runs blocks of managers as processes on this machine.

    The scaling fields are those of Parsl's providers, so a Parsl provider
    (``SlurmProvider`` and friends) can take its place.
    """

    fields = {
        "init_blocks": Field(
            1, number(0, integer=True), "Blocks started when the endpoint starts."
        ),
        "min_blocks": Field(0, number(0, integer=True), "Fewest blocks kept while idle."),
        "max_blocks": Field(1, number(0, integer=True), "Most blocks ever running at once."),
        "nodes_per_block": Field(1, number(1, integer=True), "Managers per block (one per node)."),
        "parallelism": Field(
            1.0,
            number(0),
            "Ratio of workers to pending tasks the strategy aims for (0 to 1; 0 keeps "
            "one block while there is work).",
        ),
        "worker_init": Field("", string(), "Shell commands run before each manager starts."),
        "cmd_timeout": Field(30, number(0, exclusive_minimum=True), "Seconds a submit may take."),
    }

    label = "local"

    init_blocks: int
    min_blocks: int
    max_blocks: int
    nodes_per_block: int
    parallelism: float
    worker_init: str
    cmd_timeout: float

    def validate(self) -> None:
        if self.parallelism > 1:
            raise ConfigError(
                f"LocalProvider.parallelism: expected a number from 0 to 1, got {self.parallelism}"
            )
        if self.min_blocks > self.max_blocks:
            raise ConfigError(
                f"LocalProvider: min_blocks ({self.min_blocks}) is larger than "
                f"max_blocks ({self.max_blocks})"
            )
        if not (self.min_blocks <= self.init_blocks <= self.max_blocks):
            raise ConfigError(
                "LocalProvider: init_blocks must be between min_blocks and max_blocks"
            )
        too_many = local_managers_problem(self.nodes_per_block, self.max_blocks)
        if too_many:
            raise ConfigError(f"LocalProvider{too_many}")

    # The provider interface is implemented by the executor package, which
    # binds this configuration to a reactor; these exist so a config object is
    # recognisably a provider.
    def submit(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("LocalProvider is run by the endpoint's executor")

    def status(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("LocalProvider is run by the endpoint's executor")

    def cancel(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("LocalProvider is run by the endpoint's executor")


class SimpleStrategy(ConfigObject):
    """funcX's scaling strategy: scale out to the load, in after idling."""

    fields = {
        "interval": Field(
            5.0, number(0, exclusive_minimum=True), "Seconds between scaling decisions."
        ),
        "max_idletime": Field(
            120.0,
            number(0),
            "Seconds a block may stay idle before it is scaled in (down to min_blocks).",
        ),
        # The fields only funcX 1.0 had (accepted; a warning when given).
        **funcx10.STRATEGY_FIELDS,
    }

    interval: float
    max_idletime: float
    threshold: float
