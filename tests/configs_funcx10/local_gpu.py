# Workers pinned to this machine's GPUs, in the shape of funcX 1.0.13's docs
# (the "Pinning Workers to devices" example): one worker per accelerator.
from parsl.providers import LocalProvider

from funcx_endpoint.endpoint.utils.config import Config
from funcx_endpoint.executors import HighThroughputExecutor

config = Config(
    executors=[
        HighThroughputExecutor(
            max_workers_per_node=4,
            # A count (devices "0" to "3") or a list of device names.
            available_accelerators=4,
            provider=LocalProvider(
                init_blocks=1,
                min_blocks=0,
                max_blocks=1,
            ),
        )
    ],
)
