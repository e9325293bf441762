"""The AMQP 0-9-1 spec (with RabbitMQ's extensions) that txAMQP speaks with."""

from __future__ import annotations

import os
from functools import cache

from txamqp.spec import Spec, load

SPEC_PATH: str = os.path.join(os.path.dirname(__file__), "spec", "amqp0-9-1.xml")
"""Path of the spec file shipped inside this package."""


@cache
def load_spec() -> Spec:
    """
    Return the parsed spec at L{SPEC_PATH}.

    Parsing builds Python classes for every method, so it is done once per
    process; every call returns the same L{Spec}, to be shared by all
    connections.
    """
    return load(SPEC_PATH)
