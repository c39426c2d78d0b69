"""Process-group setup, collectives (a real 2-process gloo job), seeding and RNG state."""
from __future__ import annotations

import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conchshell.errors import ConfigError
from conchshell.training.distributed import (
    all_reduce_mean,
    barrier,
    broadcast_object,
    capture_rng_state,
    cleanup_distributed,
    gather_rng_states,
    restore_rng_state,
    seed_everything,
    set_cpu_threads,
    setup_distributed,
)

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _draws() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.standard_normal(), torch.rand(4).tolist(), torch.randn(2).tolist())


def test_seed_everything_is_reproducible_and_rank_dependent():
    assert seed_everything(123, rank=0) == 123
    first = _draws()
    seed_everything(123, rank=0)
    assert _draws() == first
    assert seed_everything(123, rank=1) == 124
    assert _draws() != first


def test_rng_state_round_trips_through_weights_only_torch_load(tmp_path):
    seed_everything(5)
    # Draw one Gaussian from each source so the cached-second-Gaussian fields are in play.
    random.gauss(0, 1)
    np.random.standard_normal()
    torch.randn(3)
    path = tmp_path / "rng.pt"
    torch.save(capture_rng_state(), path)
    expected = _draws()

    seed_everything(999)  # move every generator somewhere else
    _draws()
    restore_rng_state(torch.load(path, weights_only=True))
    assert _draws() == expected


def test_single_process_without_launcher_has_no_process_group(clean_env):
    info = setup_distributed("cpu")
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (0, 0, 1, True)
    assert info.device == torch.device("cpu") and info.backend is None
    assert not dist.is_initialized()
    # Collectives degrade to identity operations.
    value = torch.tensor([1, 2, 3])
    reduced = all_reduce_mean(value)
    assert reduced.dtype == torch.float32 and reduced.tolist() == [1.0, 2.0, 3.0]
    assert broadcast_object({"a": 1}) == {"a": 1}
    barrier()
    states = gather_rng_states(info)
    assert len(states) == 1 and torch.equal(states[0]["torch"], torch.get_rng_state())
    cleanup_distributed()


def test_torchrun_single_process_and_bad_device(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "1")
    clean_env.setenv("LOCAL_RANK", "0")
    info = setup_distributed("auto")
    assert info.world_size == 1 and info.backend is None and not dist.is_initialized()
    with pytest.raises(ConfigError, match="device"):
        setup_distributed("gpu")
    with pytest.raises(ConfigError, match="dist_timeout_minutes"):
        setup_distributed("cpu", timeout_minutes=0)
    clean_env.setenv("RANK", "3")  # rank outside the world
    with pytest.raises(ConfigError, match="inconsistent"):
        setup_distributed("cpu")


def test_slurm_environment_is_read_and_rendezvous_is_required(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    info = setup_distributed("cpu")
    assert (info.rank, info.world_size) == (0, 1)
    clean_env.setenv("SLURM_PROCID", "1")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        setup_distributed("cpu")


def test_set_cpu_threads_divides_cores_and_respects_omp(clean_env):
    before = torch.get_num_threads()
    try:
        clean_env.delenv("OMP_NUM_THREADS", raising=False)
        assert set_cpu_threads(world_size=10_000) == 1  # more ranks than cores: at least one
        assert torch.get_num_threads() == 1
        assert 1 <= set_cpu_threads(world_size=1) <= len(os.sched_getaffinity(0))
        clean_env.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert set_cpu_threads(world_size=1) == 1
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    for name in ("SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(name, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    info = setup_distributed("cpu", timeout_minutes=5)
    try:
        assert (info.rank, info.local_rank, info.world_size) == (rank, rank, world_size)
        assert info.is_main == (rank == 0) and info.backend == "gloo"
        assert dist.is_initialized() and dist.get_world_size() == world_size

        local = torch.tensor([float(rank + 1), 10.0 * rank])
        mean = all_reduce_mean(local)
        assert torch.allclose(mean, torch.tensor([1.5, 5.0])), mean
        assert local.tolist() == [float(rank + 1), 10.0 * rank]  # input untouched

        assert broadcast_object({"sender": rank, "items": [1, 2]}) == {"sender": 0, "items": [1, 2]}

        seed_everything(40, rank)
        states = gather_rng_states(info)
        assert len(states) == world_size
        for other in range(world_size):
            expected = torch.Generator().manual_seed(40 + other).get_state()
            assert torch.equal(states[other]["torch"], expected), f"rank {other} state wrong"
        barrier()
    finally:
        cleanup_distributed()


def test_two_process_gloo_job():
    mp.spawn(_gloo_worker, args=(2, _free_port()), nprocs=2, join=True)
