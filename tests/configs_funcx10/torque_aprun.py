# A Torque (PBS) system with Cray's aprun, in the shape of funcX 1.0.13's
# docs (the Blue Waters example): TorqueProvider with AprunLauncher.
from parsl.addresses import address_by_hostname
from parsl.launchers import AprunLauncher
from parsl.providers import TorqueProvider

from funcx_endpoint.endpoint.utils.config import Config
from funcx_endpoint.executors import HighThroughputExecutor

user_opts = {
    "bluewaters": {
        "worker_init": "module load bwpy; source activate funcx_env",
        "scheduler_options": "",
    }
}

config = Config(
    executors=[
        HighThroughputExecutor(
            max_workers_per_node=1,
            worker_debug=False,
            address=address_by_hostname(),
            provider=TorqueProvider(
                queue="normal",
                launcher=AprunLauncher(overrides="-b -- bwpy-environ --"),
                scheduler_options=user_opts["bluewaters"]["scheduler_options"],
                worker_init=user_opts["bluewaters"]["worker_init"],
                nodes_per_block=2,
                init_blocks=0,
                min_blocks=0,
                max_blocks=1,
                walltime="00:30:00",
            ),
        )
    ],
)
