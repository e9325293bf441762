# A PBS Pro system with GPU nodes, in the shape of funcX 1.0.13's docs (the
# Polaris example: 4 GPUs a node, SimpleStrategy with its own max_idletime),
# launching with mpiexec.
from parsl.addresses import address_by_interface
from parsl.launchers import MpiExecLauncher
from parsl.providers import PBSProProvider

from funcx_endpoint.endpoint.utils.config import Config
from funcx_endpoint.executors import HighThroughputExecutor
from funcx_endpoint.strategies import SimpleStrategy

user_opts = {
    "polaris": {
        "worker_init": "",
        "scheduler_options": "#PBS -l filesystems=home:grand:eagle\n#PBS -k doe",
        "account": "",
    }
}

config = Config(
    executors=[
        HighThroughputExecutor(
            max_workers_per_node=1,
            strategy=SimpleStrategy(max_idletime=300),
            # The site's interface is 'bond0'; 'lo' is the one every test machine has.
            address=address_by_interface("lo"),
            provider=PBSProProvider(
                launcher=MpiExecLauncher(),
                account=user_opts["polaris"]["account"],
                queue="preemptable",
                cpus_per_node=32,
                select_options="ngpus=4",
                worker_init=user_opts["polaris"]["worker_init"],
                scheduler_options=user_opts["polaris"]["scheduler_options"],
                walltime="01:00:00",
                nodes_per_block=1,
                init_blocks=0,
                min_blocks=0,
                max_blocks=2,
            ),
        )
    ],
)
