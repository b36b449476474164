"""ReFrame site configuration of the four-node test cluster that tests/cluster builds on one machine
(docs/jobs.md, "A multi-node test cluster on one machine"; profile jobs/clusters/netns-test.env): Slurm
without accounting, so jobs are followed with squeue; ranks start with srun (--mpi=pmi2 from the
profile). SLURM_CONF in the environment names the cluster's controller."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LOGGING  # noqa: E402

site_configuration = {
    "systems": [{
        "name": "netns-test",
        "descr": "parabench's test cluster: 4 Slurm nodes in network namespaces, 2 ranks each",
        "hostnames": [".*"],
        "modules_system": "nomod",
        "partitions": [{
            "name": "default",
            "descr": "nodes pbnode1..4 (partition debug)",
            "scheduler": "squeue",  # no slurmdbd: sacct knows nothing
            "launcher": "srun",
            "access": [],
            "environs": ["builtin"],  # ReFrame's own: parabench is built beforehand (its README)
            "max_jobs": 4,
        }],
    }],
    "logging": LOGGING,
}
