"""ReFrame site configuration for the GPU cluster of profile jobs/clusters/example.env (4 H100 per node):
a template to copy. The partition's access options are the profile's PB_PARTITION and PB_ACCOUNT; the
environment loads the profile's modules; the checks add --nodes, --ntasks-per-node, --gpus-per-node,
--cpus-per-task and srun's --mpi and --cpu-bind from the profile."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LOGGING  # noqa: E402

site_configuration = {
    "systems": [{
        "name": "example",
        "descr": "a GPU cluster: 4 H100 SXM and 64 cores per node",
        "hostnames": [r"login\d+"],
        "modules_system": "lmod",
        "partitions": [{
            "name": "booster",
            "scheduler": "slurm",
            "launcher": "srun",
            "access": ["--partition=booster", "--account=myproject", "--exclusive"],
            "environs": ["gnu-cuda"],
            "max_jobs": 16,
        }],
    }],
    "environments": [{
        "name": "gnu-cuda",
        "modules": ["GCC", "OpenMPI", "CUDA", "NCCL", "HDF5", "OpenBLAS", "CMake"],
        "cc": "mpicc", "cxx": "mpicxx", "ftn": "",
    }],
    "logging": LOGGING,
}
