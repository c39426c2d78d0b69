"""Process-group setup from the launcher's environment, plus seeding and RNG state.

Launch with ``torchrun --nproc_per_node=N train.py ...`` (it sets RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or as a plain ``python train.py`` for one process.
There is no ``--local_rank`` argument: everything comes from the environment.

Under SLURM without torchrun (``srun python train.py``), RANK/WORLD_SIZE/LOCAL_RANK are
derived from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID. SLURM does not provide a rendezvous
address, so the job script must export MASTER_ADDR (e.g. the first host of
``scontrol show hostnames $SLURM_JOB_NODELIST``) and MASTER_PORT (any free port, the same on
every task) before ``srun``.
"""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from conchshell.errors import ConfigError
from conchshell.utils.precision import use_ieee_fp32


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job and which device it drives."""

    rank: int
    local_rank: int
    world_size: int
    is_main: bool
    device: torch.device
    backend: str | None  # None when no process group was created (single process)


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _launcher_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's or SLURM's environment; (0, 0, 1) otherwise."""
    if os.environ.get("RANK") is not None:
        rank = _env_int("RANK", 0)
        world_size = _env_int("WORLD_SIZE", 1)
        local_rank = _env_int("LOCAL_RANK", 0)
    elif os.environ.get("SLURM_PROCID") is not None and os.environ.get("SLURM_NTASKS") is not None:
        rank = _env_int("SLURM_PROCID")
        world_size = _env_int("SLURM_NTASKS")
        local_rank = _env_int("SLURM_LOCALID", 0)
        if world_size > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
            if missing:
                raise ConfigError(
                    f"SLURM job with {world_size} tasks but {', '.join(missing)} not set: export "
                    "MASTER_ADDR (first node's host name) and MASTER_PORT (a free port) before srun"
                )
    else:
        return 0, 0, 1
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(f"inconsistent launcher environment: rank={rank} local_rank={local_rank} "
                          f"world_size={world_size}")
    return rank, local_rank, world_size


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                          "device(s) are visible: lower --nproc_per_node")
    torch.cuda.set_device(local_rank)
    use_ieee_fp32()
    return torch.device("cuda", local_rank)


def setup_distributed(device: str = "auto", timeout_minutes: float = 60.0) -> DistInfo:
    """Read the launcher environment, pick this rank's device and join the process group.

    ``device``: "auto" (CUDA when available, else CPU), "cpu" or "cuda". With more than one
    process the group uses NCCL on CUDA and gloo on CPU. A single process (plain ``python``
    or ``torchrun --nproc_per_node=1``) creates no process group, so every collective below
    is a no-op for it. ``timeout_minutes`` bounds every wait in a collective (the config's
    ``train.dist_timeout_minutes``).
    """
    if not timeout_minutes > 0:
        raise ConfigError(f"train.dist_timeout_minutes must be > 0, got {timeout_minutes!r}")
    rank, local_rank, world_size = _launcher_ranks()
    torch_device = _pick_device(device, local_rank)
    backend: str | None = None
    if world_size > 1:
        if dist.is_initialized():
            backend = dist.get_backend()
        else:
            backend = "nccl" if torch_device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, is_main=rank == 0,
                    device=torch_device, backend=backend)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def cleanup_distributed() -> None:
    """Leave the process group (if any) so the launcher sees a clean exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; a no-op for a single process."""
    if not _active():
        return
    if dist.get_backend() == "nccl":
        # Naming the device avoids NCCL guessing (and warning about) which GPU to use.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all ranks and return the result as a new floating tensor.

    The input is left untouched and the result lives on the input's device. Under NCCL a CPU
    tensor (e.g. a logged loss) is moved to this rank's GPU for the reduction and back.
    """
    result = tensor.detach().clone()
    if not result.is_floating_point():
        result = result.float()
    if not _active():
        return result
    home = result.device
    if dist.get_backend() == "nccl" and home.type != "cuda":
        result = result.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(result, op=dist.ReduceOp.SUM)
    result /= dist.get_world_size()
    return result.to(home)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects only)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and all GPUs) with ``seed + rank``; return that seed.

    The rank offset gives each process different augmentation/noise draws while keeping the
    whole job reproducible. Model initialisation that must match across ranks is handled by
    DDP, which broadcasts rank 0's parameters.
    """
    effective = seed + rank
    random.seed(effective)
    np.random.seed(effective % 2**32)  # numpy only accepts 32-bit seeds
    torch.manual_seed(effective)  # also seeds every CUDA device
    return effective


def _physical_cores(cpus: set[int]) -> int:
    """Count distinct physical cores among logical ``cpus`` (hyper-threads share a core)."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return len(cpus)  # no sysfs topology (containers, non-Linux): count logical CPUs
        cores.add((package, core))
    return max(1, len(cores))


def set_cpu_threads(world_size: int = 1) -> int:
    """Give torch a fair share of this machine's cores and return the thread count used.

    The cores this process may run on (its CPU affinity, which respects cgroups/taskset),
    counted as physical cores, are divided among the ranks on this node (LOCAL_WORLD_SIZE
    from torchrun, else ``world_size``): oversubscribing cores makes every rank slower.
    An explicit OMP_NUM_THREADS wins and is left alone.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS/Windows
        cpus = set(range(os.cpu_count() or 1))
    local_procs = _env_int("LOCAL_WORLD_SIZE", None) or max(1, world_size)
    threads = max(1, _physical_cores(cpus) // local_procs)
    torch.set_num_threads(threads)
    return threads


def capture_rng_state() -> dict[str, Any]:
    """Snapshot the python, numpy, torch CPU and CUDA generators.

    The result holds only tensors, lists, tuples, ints, floats and strings, so it survives
    ``torch.save`` and ``torch.load(weights_only=True)`` (which refuses numpy objects).
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back generators captured by :func:`capture_rng_state`.

    CUDA states are restored for as many devices as both the snapshot and this machine have,
    so a checkpoint from a CPU run (no CUDA states) still resumes on a GPU machine.
    """
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        for index in range(min(len(cuda_states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda_states[index], device=index)


def gather_rng_states(dist_info: DistInfo) -> list[dict[str, Any]]:
    """Every rank's :func:`capture_rng_state`, indexed by rank (complete on rank 0).

    Must be called by all ranks together. On resume, rank r restores entry r when the world
    size is unchanged.
    """
    own = capture_rng_state()
    if not _active():
        return [own]
    states: list[Any] = [None] * dist_info.world_size
    # The states are CPU byte tensors (CUDA generator states too), so under NCCL only the
    # pickled bytes travel through the GPU and the checkpoint stays device-independent.
    dist.all_gather_object(states, own)
    return states
