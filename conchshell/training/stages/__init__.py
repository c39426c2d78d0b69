"""Training stages: what is trained, how one step goes, how it is validated and exported.

The trainer (:mod:`conchshell.training.trainer`) owns the loop, the data order, logging and
checkpoints; a :class:`Stage` owns its networks, optimisers and schedulers. Three stages:

- ``tcnn``: the image classifier (cross-entropy on logits), exported as ``TCNN-*.pt``;
- ``vqvae``: the project's own Jukebox-architecture codec, exported as ``codec-*.pt``;
- ``gan``: the generator against the multi-scale discriminator, exported as ``G-*.pt``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import Dataset

from conchshell.config import Config
from conchshell.constants import IMAGE_MEAN, IMAGE_STD
from conchshell.errors import ConchShellError, ConfigError
from conchshell.training.distributed import DistInfo, all_reduce_mean
from conchshell.training.logging import MetricsLogger
from conchshell.utils.precision import bf16_supported, bf16_unsupported_reason, check_precision

Batch = dict[str, Any]


class NonFiniteLossError(ConchShellError):
    """A loss term became NaN or Inf; raised before any optimiser step uses it."""

    def __init__(self, term: str, value: float) -> None:
        super().__init__(f"loss term '{term}' is {value}")
        self.term = term
        self.value = value


def unnormalise_image(image: Tensor) -> Tensor:
    """A normalised [3,H,W] image back to [0, 1] for display."""
    mean = image.new_tensor(IMAGE_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGE_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0.0, 1.0)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
            for key, value in batch.items()}


def take_windows(x: Tensor, starts: Tensor, length: int) -> Tensor:
    """``x[i, ..., starts[i]:starts[i] + length]`` for every item ``i`` of the batch."""
    return torch.stack([item[..., start:start + length] for item, start in zip(x, starts.tolist())])


class Stage:
    """Base of the three stages. Subclasses set the class attributes and fill ``self.models``,
    ``self.optimizers`` and ``self.schedulers`` (all keyed by the same short names)."""

    name: str = ""
    export_prefix: str = ""
    metric_name: str = ""  # validation scalar that picks the best checkpoint (lower is better)

    def __init__(self, config: Config, dist_info: DistInfo) -> None:
        self.config = config
        self.dist = dist_info
        self.device = dist_info.device
        precision = config.train.precision
        check_precision(precision, "train.precision")
        # bf16 where the hardware runs it at speed; elsewhere (pre-Ampere GPUs, CPUs without
        # oneDNN's bf16 kernels) fp32, said once, since a bf16 config then trains in fp32.
        self.use_bf16 = precision == "bf16" and bf16_supported(self.device)
        if precision == "bf16" and not self.use_bf16 and dist_info.is_main:
            warnings.warn(f"train.precision bf16: {bf16_unsupported_reason(self.device)}; training in fp32",
                          stacklevel=2)
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, Optimizer] = {}
        self.schedulers: dict[str, LRScheduler] = {}

    # ------------------------------------------------------------------ for subclasses
    def prepare(self, train_set: Dataset, collate: Callable[[list[Any]], Batch]) -> None:
        """Set what a fresh run derives from its training data before the first step (not
        called on resume: the checkpoint carries it). Every rank computes the same."""

    def train_step(self, micro_batches: list[Batch]) -> dict[str, Tensor]:
        """One optimiser step over ``micro_batches`` (gradient accumulation); returns detached
        loss scalars for logging. Raises NonFiniteLossError before stepping on a NaN/Inf."""
        raise NotImplementedError

    def validate(self, batches: Iterable[Batch], num_media: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(scalars including ``metric_name``, media of the first ``num_media`` items).

        Runs on the main rank only, on the unwrapped modules, so it needs no collectives."""
        raise NotImplementedError

    def export(self, path: Path, step: int) -> None:
        """Write the deployable weights file of this stage (weights-only)."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """State outside the modules' state dicts that exact resume needs."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def log_media(self, logger: MetricsLogger, step: int, media: list[dict[str, Any]]) -> None:
        """Send validation media to TensorBoard: ``image`` [3,H,W] (normalised), audio
        ``audio/<name>`` [1,T] and their log-mels ``mel/<name>`` [n_mels, frames]."""
        for index, item in enumerate(media):
            for key, value in item.items():
                tag = f"val_{index}/{key}"
                if key == "image":
                    logger.log_image(step, tag, unnormalise_image(value))
                elif key.startswith("audio/"):
                    logger.log_audio(step, tag, value, self.config.data.sample_rate)
                elif key.startswith("mel/"):
                    logger.log_mel_image(step, tag, value)

    # ------------------------------------------------------------------ shared helpers
    def wrap(self, module: nn.Module, **ddp_kwargs: Any) -> nn.Module:
        """``module`` in DistributedDataParallel when several processes train, else as is."""
        if self.dist.world_size == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, **ddp_kwargs)

    @staticmethod
    def sync_gradients(wrapped: nn.Module, last_micro_step: bool) -> ContextManager[Any]:
        """DDP all-reduces gradients only on the last micro-step of an accumulation."""
        if isinstance(wrapped, DistributedDataParallel) and not last_micro_step:
            return wrapped.no_sync()
        return contextlib.nullcontext()

    def autocast(self) -> ContextManager[Any]:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def check_finite(self, losses: Mapping[str, Tensor]) -> None:
        """Raise NonFiniteLossError naming the first NaN/Inf term, on every rank at once.

        The flags are averaged over ranks so that all of them stop together, rather than one
        rank exiting while the others wait in the next collective.
        """
        names = list(losses)
        flags = torch.stack([torch.isfinite(losses[n].detach().float()).all() for n in names]).float()
        flags = all_reduce_mean(flags)
        for name, flag in zip(names, flags.tolist()):
            if flag < 1.0:
                value = float(losses[name].detach().float().sum())
                raise NonFiniteLossError(name, value if not math.isfinite(value) else float("nan"))

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def learning_rates(self) -> dict[str, float]:
        return {f"lr/{name}": float(opt.param_groups[0]["lr"]) for name, opt in self.optimizers.items()}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str) -> None:
        for part, own in (("optimizers", self.optimizers), ("schedulers", self.schedulers)):
            self._check_parts(state, part, own, source)
        self.load_model_weights(state, source)  # checks the "models" part itself
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        self.load_extra_state(state.get("extra", {}))

    def load_model_weights(self, state: Mapping[str, Any], source: str, allow_new: bool = False) -> list[str]:
        """The networks' weights of a checkpoint, nothing else. ``allow_new`` (``train.init_from``)
        lets the networks hold parameters the checkpoint lacks, e.g. a head added for
        fine-tuning: they keep their initialisation and are returned as ``model.key``."""
        from conchshell.utils.checkpoint import load_strict

        self._check_parts(state, "models", self.models, source)
        return [f"{name}.{key}" for name, model in self.models.items()
                for key in load_strict(model, state["models"][name], f"{source} [{name}]", allow_missing=allow_new)]

    def _check_parts(self, state: Mapping[str, Any], part: str, own: Mapping[str, Any], source: str) -> None:
        saved = state.get(part, {})
        if set(saved) != set(own):
            raise ConchShellError(f"{source}: checkpoint {part} {sorted(saved)} do not match "
                                  f"the {self.name} stage's {sorted(own)}")


def build_stage(config: Config, dist_info: DistInfo) -> Stage:
    """The stage named by ``config.train.stage``, its networks on this rank's device."""
    # Imported here: each stage pulls in its own models, and the gan stage the frozen I3D.
    if config.train.stage == "gan":
        from conchshell.training.stages.gan import GanStage

        return GanStage(config, dist_info)
    if config.train.stage == "tcnn":
        from conchshell.training.stages.tcnn import TcnnStage

        return TcnnStage(config, dist_info)
    if config.train.stage == "vqvae":
        from conchshell.training.stages.vqvae import VqvaeStage

        return VqvaeStage(config, dist_info)
    raise ConfigError(f"train.stage must be 'tcnn', 'vqvae' or 'gan', got {config.train.stage!r}")


__all__ = ["Batch", "NonFiniteLossError", "Stage", "build_stage", "to_device", "unnormalise_image"]
