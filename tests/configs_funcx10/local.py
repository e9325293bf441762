# funcX 1.0.13's default config.py (what `funcx-endpoint configure` wrote):
# Parsl's LocalProvider under funcX's Config and HighThroughputExecutor.
from parsl.providers import LocalProvider

from funcx_endpoint.endpoint.utils.config import Config
from funcx_endpoint.executors import HighThroughputExecutor

config = Config(
    executors=[
        HighThroughputExecutor(
            provider=LocalProvider(
                init_blocks=1,
                min_blocks=0,
                max_blocks=1,
            ),
        )
    ],
)

# funcX 1.0 read endpoint metadata from here; unused by the endpoint itself.
meta = {
    "name": "local",
    "description": "",
    "organization": "",
    "department": "",
    "public": False,
    "visible_to": [],
}
