"""The trial suite.

Property tests (hypothesis) run with no per-example deadline and without
the "input generation is slow" health check: the suite shares a 2-core
machine with brokers, databases and endpoint processes, and a slow moment
there says nothing about the property.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "funcx-endpoint", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("funcx-endpoint")
