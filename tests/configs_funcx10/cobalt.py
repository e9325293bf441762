# A Cobalt system, in the shape of funcX 1.0.13's docs (the Cooley example):
# CobaltProvider with MpiExecLauncher, the address of a given interface.
from parsl.addresses import address_by_interface
from parsl.launchers import MpiExecLauncher
from parsl.providers import CobaltProvider

from funcx_endpoint.endpoint.utils.config import Config
from funcx_endpoint.executors import HighThroughputExecutor

user_opts = {
    "cooley": {
        "worker_init": "source ~/setup_funcx_test_env.sh",
        "scheduler_options": "",
        "account": "<YOUR_COOLEY_ALLOCATION>",
    }
}

config = Config(
    executors=[
        HighThroughputExecutor(
            max_workers_per_node=2,
            worker_debug=False,
            # The site's interface is 'ib0'; 'lo' is the one every test machine has.
            address=address_by_interface("lo"),
            provider=CobaltProvider(
                queue="default",
                account=user_opts["cooley"]["account"],
                launcher=MpiExecLauncher(),
                scheduler_options=user_opts["cooley"]["scheduler_options"],
                worker_init=user_opts["cooley"]["worker_init"],
                nodes_per_block=2,
                init_blocks=0,
                min_blocks=0,
                max_blocks=1,
                walltime="00:30:00",
            ),
        )
    ],
)
