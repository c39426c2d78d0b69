"""The training loop shared by the three stages, readable top to bottom.

``train(config, out_dir)`` runs the same under ``python train.py`` (one process, no
process group) and ``torchrun --nproc_per_node=N train.py`` (one process per device; DDP).
The loop owns what every stage shares: the data order (a DistributedSampler whose epoch and
position in the epoch are checkpointed, so a resumed run sees exactly the batches the
interrupted one would have), gradient accumulation, rank-0 logging, validation, and
atomic checkpoints with keep-last-k plus best. The stage (``conchshell.training.stages``)
owns the networks, the losses of one step and the export file.

Output folder::

    config.yaml                  resolved config of this run
    ckpt-step=00002000.pt        full training state (latest train.keep_last kept)
    ckpt-best.pt, best.json      best by the stage's validation metric
    G-step=2000.pt, G-best.pt    stage export (G / TCNN / codec), weights only
    metrics.jsonl, tensorboard/  logs (rank 0)
"""
from __future__ import annotations

import itertools
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, default_collate

from conchshell.config import Config, config_from_dict, config_to_dict
from conchshell.data.dataset import ImageMusicDataset
from conchshell.data.manifest import read_manifest, select_split
from conchshell.errors import CheckpointError, ConchShellError, ConfigError, DataError
from conchshell.training.checkpointing import CheckpointManager, git_commit, save_config_next_to
from conchshell.training.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gather_rng_states,
    restore_rng_state,
    seed_everything,
    set_cpu_threads,
    setup_distributed,
)
from conchshell.training.logging import MetricsLogger
from conchshell.training.stages import NonFiniteLossError, Stage, build_stage

CHECKPOINT_FORMAT = "conchshell-train-v1"


class TrainingDivergedError(ConchShellError):
    """A loss became NaN/Inf; the run stopped without saving the poisoned state."""


# ----------------------------------------------------------------------------- data order


class ResumableSampler(Sampler[tuple[int, int]]):
    """DistributedSampler's shuffled order for one epoch, starting ``start`` items in.

    The order depends only on (seed, epoch, rank, world size), so skipping the items an
    interrupted run already consumed resumes the epoch with the same samples in the same
    order. With one process it is a plain seeded shuffle. It yields ``(epoch, index)``
    keys: the dataset draws each item's crop and gain from them, so DataLoader workers
    need no per-epoch message and can persist across epochs.
    """

    def __init__(self, dataset_size: int, dist_info: DistInfo, seed: int) -> None:
        self.inner = DistributedSampler(range(dataset_size), num_replicas=dist_info.world_size,
                                        rank=dist_info.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.inner.epoch
        return ((epoch, index) for index in itertools.islice(iter(self.inner), self.start, None))

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.start)

    @property
    def epoch_size(self) -> int:
        return len(self.inner)


def make_datasets(config: Config, frontend: torch.nn.Module | None = None
                  ) -> tuple[ImageMusicDataset, ImageMusicDataset | None, Callable[[list[Any]], Any]]:
    """(training set with random crops/gains, first ``max_val_items`` of the val split or
    None, the collate function). ``frontend`` (GAN stage) selects the feature cache entries."""
    records = read_manifest(config.data.manifest, seed=config.data.split_seed)
    train_records = select_split(records, "train")
    val_records = select_split(records, "val")[: config.train.max_val_items]
    if not train_records:
        raise DataError(f"{config.data.manifest}: the train split is empty")
    common = dict(sample_rate=config.data.sample_rate, clip_seconds=config.data.clip_seconds,
                  seed=config.train.seed)
    cache = _feature_cache(config, frontend)
    collate: Callable[[list[Any]], Any] = default_collate
    if cache is not None:
        from conchshell.data.feature_cache import collate_cached

        common["feature_cache"] = cache
        collate = collate_cached  # a batch carries features only when all its items have them
    train_set = ImageMusicDataset(train_records, train=True, **common)
    val_set = ImageMusicDataset(val_records, train=False, **common) if val_records else None
    return train_set, val_set, collate


def _feature_cache(config: Config, frontend: torch.nn.Module | None) -> Any:
    """The frozen-feature cache for the GAN stage when ``data.feature_cache`` is set, else None."""
    if config.data.feature_cache is None or config.train.stage != "gan":
        return None
    try:
        from conchshell.data.feature_cache import open_for_config
    except ImportError as exc:
        raise ConfigError(f"data.feature_cache is set but the feature cache is unavailable: {exc}") from exc
    return open_for_config(config, frontend)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_state(stage: Stage, config: Config, dist_info: DistInfo, step: int, epoch: int,
                     position: int) -> dict[str, Any]:
    """Everything a resume needs. Collective (gathers every rank's RNG): call on all ranks."""
    rng = gather_rng_states(dist_info)
    return {
        "format": CHECKPOINT_FORMAT,
        "stage": stage.name,
        "step": step,
        "epoch": epoch,
        "position": position,  # micro-batches of `epoch` already consumed by this rank
        "world_size": dist_info.world_size,
        **stage.state_dict(),
        "rng": rng,
        "config": config_to_dict(config),
        "git_commit": git_commit() or "",
    }


def prune_exports(out_dir: Path, prefix: str, keep_steps: set[int]) -> None:
    """Delete ``<prefix>-step=N.pt`` files whose full checkpoint has been rotated away."""
    pattern = re.compile(rf"^{re.escape(prefix)}-step=(\d+)\.pt$")
    for path in out_dir.iterdir():
        match = pattern.match(path.name)
        if match and int(match.group(1)) not in keep_steps:
            path.unlink(missing_ok=True)


def resolve_resume(out_dir: Path, resume: str | bool | None, manager: CheckpointManager | None) -> str | None:
    """Main rank: the checkpoint to resume from. ``resume`` is a path, True (latest in
    ``out_dir``, which must exist) or None/False (latest in ``out_dir`` if there is one)."""
    if isinstance(resume, str):
        if not Path(resume).is_file():
            raise CheckpointError(f"--resume: checkpoint not found: {resume}")
        return resume
    latest = manager.latest() if manager is not None else None
    if resume is True and latest is None:
        raise CheckpointError(f"--resume: no checkpoint (ckpt-step=*.pt) in {out_dir}")
    return str(latest) if latest is not None else None


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


# ----------------------------------------------------------------------------- the loop


def train(config: Config, out_dir: str | Path, resume: str | bool | None = None) -> Path:
    """Run (or resume) the stage named by ``config.train.stage``; returns the output folder."""
    dist_info = setup_distributed(config.train.device, config.train.dist_timeout_minutes)
    try:
        return _train(config, Path(out_dir), resume, dist_info)
    finally:
        cleanup_distributed()


def _train(config: Config, out_dir: Path, resume: str | bool | None, dist_info: DistInfo) -> Path:
    tc = config.train
    for name in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "ckpt_every", "keep_last"):
        if getattr(tc, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(tc, name)}")
    if dist_info.device.type == "cpu":
        set_cpu_threads(dist_info.world_size)
    is_main = dist_info.is_main

    # --- where to start: the main rank decides (it also clears stale temp files), all follow.
    manager = CheckpointManager(out_dir, keep_last=tc.keep_last) if is_main else None
    resume_path = resolve_resume(out_dir, resume, manager) if is_main else None
    resume_path = broadcast_object(resume_path)
    state = CheckpointManager.load(Path(resume_path)) if resume_path else None
    if state is not None:
        _check_resumable(state, config, resume_path, is_main)
    initial = None
    if state is None and tc.init_from is not None:
        if not Path(tc.init_from).is_file():
            raise CheckpointError(f"train.init_from: checkpoint not found: {tc.init_from}")
        initial = CheckpointManager.load(Path(tc.init_from))
        _check_stage_checkpoint(initial, config, f"train.init_from {tc.init_from}")

    # --- networks: identical initialisation on every rank, then rank-dependent randomness.
    torch.manual_seed(tc.seed)
    stage = build_stage(config, dist_info)
    step, epoch, position = 0, 0, 0
    new_parameters: list[str] = []
    if state is None:
        if initial is not None:
            new_parameters = stage.load_model_weights(initial, tc.init_from, allow_new=True)
        seed_everything(tc.seed, dist_info.rank)
    else:
        stage.load_state_dict(state, resume_path)
        step, epoch, position = int(state["step"]), int(state["epoch"]), int(state["position"])
        rng = state.get("rng", [])
        if int(state.get("world_size", -1)) == dist_info.world_size and len(rng) == dist_info.world_size:
            restore_rng_state(rng[dist_info.rank])
        else:
            if is_main:
                warnings.warn(f"resuming with {dist_info.world_size} processes from a checkpoint of "
                              f"{state.get('world_size')}: data order and random draws will differ", stacklevel=2)
            seed_everything(tc.seed + step, dist_info.rank)
            position = 0
    del state, initial  # checkpoints may be large; the stage holds its own copies now

    # --- data
    uses_cache = config.data.feature_cache is not None and stage.name == "gan"
    train_set, val_set, collate = make_datasets(config, getattr(stage, "frontend") if uses_cache else None)
    if resume_path is None and tc.init_from is None:  # otherwise the checkpoint carries it
        stage.prepare(train_set, collate)
    sampler = ResumableSampler(len(train_set), dist_info, tc.seed)
    # A private generator: creating a DataLoader iterator must not consume the global RNG,
    # or a run resumed mid-epoch would draw different random numbers from then on.
    # Workers persist across epochs: the sampler's (epoch, index) keys carry all the
    # per-epoch randomness, so nothing has to reach the workers' copies of the dataset.
    loader = DataLoader(train_set, batch_size=tc.batch_size, sampler=sampler, drop_last=True, collate_fn=collate,
                        num_workers=config.data.num_workers, pin_memory=dist_info.device.type == "cuda",
                        persistent_workers=config.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(tc.seed))
    steps_per_epoch = (sampler.epoch_size // tc.batch_size) // tc.grad_accum
    if steps_per_epoch == 0:
        raise DataError(f"{config.data.manifest}: {len(train_set)} training items cannot fill one step of "
                        f"{dist_info.world_size} process(es) x batch {tc.batch_size} x accumulation {tc.grad_accum}")
    val_loader = (DataLoader(val_set, batch_size=tc.batch_size, shuffle=False, collate_fn=collate,
                             num_workers=config.data.num_workers) if val_set is not None and is_main else None)

    if is_main:
        save_config_next_to(config_to_dict(config), out_dir)
    logger = MetricsLogger(out_dir, is_main)
    bar = logger.progress(total=tc.max_steps, initial=step)
    if is_main:
        what = (f"resuming from {resume_path} at step {step}" if resume_path else
                f"starting from the weights of {tc.init_from}" if tc.init_from else "starting")
        if new_parameters:
            what += (f" ({len(new_parameters)} tensors it lacks keep their initialisation: "
                     f"{', '.join(new_parameters[:4])}{', ...' if len(new_parameters) > 4 else ''})")
        bar.write(f"{stage.name} stage: {what}; {dist_info.world_size} process(es) on {dist_info.device}, "
                  f"{len(train_set)} training items, {steps_per_epoch} steps per epoch", file=sys.stderr)

    last_saved = resume_path
    timer = time.perf_counter()
    try:
        while step < tc.max_steps:
            sampler.set_epoch(epoch, start=position * tc.batch_size)
            batches = iter(loader)
            for _ in range(steps_per_epoch - position // tc.grad_accum):
                if step >= tc.max_steps:
                    break
                micro_batches = [next(batches) for _ in range(tc.grad_accum)]
                try:
                    losses = stage.train_step(micro_batches)
                except NonFiniteLossError as exc:
                    raise TrainingDivergedError(
                        f"{exc} at step {step + 1}; stopped before saving that step "
                        f"(last good checkpoint: {last_saved or 'none'})") from None
                step += 1
                position += tc.grad_accum
                if position >= steps_per_epoch * tc.grad_accum:
                    epoch, position = epoch + 1, 0
                bar.update(1)

                if step % tc.log_every == 0 or step == tc.max_steps:
                    elapsed, timer = time.perf_counter() - timer, time.perf_counter()
                    scalars = _mean_over_ranks(losses)
                    bar.set_postfix({k.replace("/", "_"): f"{v:.4g}" for k, v in scalars.items()
                                     if k.endswith("loss")})
                    scalars.update(stage.learning_rates())
                    scalars.update({"epoch": epoch, "time/step_s": elapsed / min(step, tc.log_every)})
                    logger.log_scalars(step, scalars)

                is_ckpt = step % tc.ckpt_every == 0 or step == tc.max_steps
                metric = None
                if step % tc.eval_every == 0 or is_ckpt:
                    metric = _validate(stage, val_loader, logger, step, tc.num_eval_samples,
                                       with_media=step % tc.eval_every == 0 or step == tc.max_steps)
                if is_ckpt:
                    last_saved = _save(stage, config, dist_info, manager, out_dir, step, epoch, position, metric)
    finally:
        bar.close()
        logger.close()
    if is_main:
        print(f"done: {stage.name} stage reached step {step}; outputs in {out_dir}", file=sys.stderr)
    return out_dir


def _check_stage_checkpoint(state: Mapping[str, Any], config: Config, path: str) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a train.py checkpoint (format {state.get('format')!r})")
    if state.get("stage") != config.train.stage:
        raise CheckpointError(f"{path} is a '{state.get('stage')}' stage checkpoint but train.stage is "
                              f"'{config.train.stage}'")


def _check_resumable(state: Mapping[str, Any], config: Config, path: str, is_main: bool) -> None:
    _check_stage_checkpoint(state, config, path)
    if is_main and "config" in state:
        saved = config_to_dict(config_from_dict(state["config"], source=path))
        changed = config_differences(saved, config_to_dict(config))
        if changed:
            warnings.warn(f"resuming {path} with a changed config: {'; '.join(changed[:6])}"
                          + (f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""), stacklevel=2)


def _mean_over_ranks(losses: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Average every logged scalar over ranks (one collective for all of them)."""
    names = sorted(losses)
    values = torch.stack([torch.as_tensor(losses[n], dtype=torch.float32).reshape(()).float().cpu()
                          for n in names])
    return dict(zip(names, all_reduce_mean(values).tolist()))


def _validate(stage: Stage, val_loader: DataLoader | None, logger: MetricsLogger, step: int,
              num_media: int, with_media: bool) -> float | None:
    """Validation on the main rank (unwrapped modules, no collectives); the others wait."""
    metric = None
    if val_loader is not None:
        scalars, media = stage.validate(val_loader, num_media if with_media else 0)
        logger.log_scalars(step, scalars)
        if with_media:
            stage.log_media(logger, step, media)
        metric = scalars[stage.metric_name]
    barrier()
    return metric


def _save(stage: Stage, config: Config, dist_info: DistInfo, manager: CheckpointManager | None,
          out_dir: Path, step: int, epoch: int, position: int, metric: float | None) -> str | None:
    """Write the checkpoint and the stage export (main rank), then let every rank go on."""
    state = checkpoint_state(stage, config, dist_info, step, epoch, position)
    path = None
    if manager is not None:
        path = manager.save(step, state, metric)
        stage.export(out_dir / f"{stage.export_prefix}-step={step}.pt", step)
        if manager.best_step == step:
            stage.export(out_dir / f"{stage.export_prefix}-best.pt", step)
        prune_exports(out_dir, stage.export_prefix, {s for s, _ in manager.checkpoints()})
    del state
    barrier()
    return str(path) if path is not None else None
