"""ReFrame site configuration for one machine without Slurm (profile jobs/clusters/local.env): the
checks run one after another through the local scheduler, their ranks started with mpiexec -n."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LOGGING  # noqa: E402

site_configuration = {
    "systems": [{
        "name": "local",
        "descr": "this machine, without a batch scheduler",
        "hostnames": [".*"],
        "modules_system": "nomod",
        "partitions": [{
            "name": "default",
            "scheduler": "local",
            "launcher": "mpiexec",
            "environs": ["builtin"],  # ReFrame's own: parabench is built beforehand (its README)
            "max_jobs": 1,  # timings of checks side by side would disturb each other
        }],
    }],
    "logging": LOGGING,
}
