# A Slurm cluster, in the shape of funcX 1.0.13's docs (the Midway example):
# SlurmProvider with SrunLauncher, managers calling back to this login node.
from parsl.addresses import address_by_hostname
from parsl.launchers import SrunLauncher
from parsl.providers import SlurmProvider

from funcx_endpoint.endpoint.utils.config import Config
from funcx_endpoint.executors import HighThroughputExecutor

# Site settings (the docs asked users to fill these in).
user_opts = {
    "midway": {
        "worker_init": "source ~/setup_funcx_test_env.sh",
        "scheduler_options": "",
    }
}

config = Config(
    executors=[
        HighThroughputExecutor(
            max_workers_per_node=2,
            worker_debug=False,
            address=address_by_hostname(),
            provider=SlurmProvider(
                partition="broadwl",
                launcher=SrunLauncher(),
                scheduler_options=user_opts["midway"]["scheduler_options"],
                worker_init=user_opts["midway"]["worker_init"],
                nodes_per_block=2,
                init_blocks=0,
                min_blocks=0,
                max_blocks=1,
                walltime="00:30:00",
            ),
        )
    ],
)
