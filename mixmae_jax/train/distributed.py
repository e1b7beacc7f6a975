"""Multi-process start-up: `jax.distributed.initialize` when the job spans several processes.

Call `maybe_initialize_distributed()` first thing in the entry point, before any other JAX use
(JAX refuses to initialise once a backend exists) and before importing TF-heavy modules.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax


def detect_multiprocess(env: Mapping[str, str] = os.environ) -> str | None:
    """Name of the multi-process launcher visible in `env`, or None for a single process.

    Only launchers that `jax.distributed.initialize()` can configure on its own are named, so
    the caller can then call it without arguments.
    """
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "openmpi"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu-multislice"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu-pod"
    return None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> bool:
    """Initialise JAX's distributed runtime if this is a multi-process job; True if it is.

    Explicit arguments (e.g. from `--coordinator_address/--num_processes/--process_id`, for GPU
    launchers JAX cannot detect) win; otherwise SLURM (`SLURM_NTASKS` > 1), Open MPI and TPU pod /
    multislice environments are detected and `jax.distributed.initialize()` configures itself.
    `auto=True` calls it without arguments regardless (e.g. on a Cloud TPU pod whose workers are
    only listed by the metadata server). A single process is a no-op.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator_address, num_processes, process_id)
    if any(a is not None for a in explicit):
        if num_processes == 1 and coordinator_address is None:
            return False
        logging.info(
            "jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s)",
            *explicit,
        )
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
        return True
    launcher = "requested" if auto else detect_multiprocess()
    if launcher is None:
        return False
    logging.info("jax.distributed.initialize() (%s)", launcher)
    jax.distributed.initialize()
    return True
