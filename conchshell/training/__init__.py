"""Model-independent training infrastructure: process groups, checkpoints, logging."""
from conchshell.training.checkpointing import (
    CheckpointManager,
    export_weights,
    git_commit,
    save_checkpoint,
    save_config_next_to,
)
from conchshell.training.distributed import (
    DistInfo,
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
from conchshell.training.logging import MetricsLogger, progress

__all__ = [
    "CheckpointManager",
    "DistInfo",
    "MetricsLogger",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "capture_rng_state",
    "cleanup_distributed",
    "export_weights",
    "gather_rng_states",
    "git_commit",
    "progress",
    "restore_rng_state",
    "save_checkpoint",
    "save_config_next_to",
    "seed_everything",
    "set_cpu_threads",
    "setup_distributed",
]
