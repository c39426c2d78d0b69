"""The TCNN stage: the image classifier whose time features and class feed the generator.

Cross-entropy on the classifier's logits (the released code put a sigmoid before
CrossEntropy, a bug: DESIGN.md section 2). The recipe is multi-stage: AdamW at
``optim.tcnn_lr``, multiplied by ``optim.tcnn_gamma`` at each step of
``optim.tcnn_milestones`` (a coarse phase, then fine-tuning phases at lower rates).
The export ``TCNN-*.pt`` is what ``image.tcnn_checkpoint`` points at in later stages.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from conchshell.config import Config
from conchshell.constants import CLASS_NAMES
from conchshell.models.factory import build_tcnn_from_config
from conchshell.training.checkpointing import export_weights, git_commit
from conchshell.training.distributed import DistInfo
from conchshell.training.optim import DEFAULT_BETAS, adamw, clip_gradients, multi_stage, trainable_parameters
from conchshell.training.stages import Batch, Stage, to_device

EXPORT_FORMAT = "conchshell-tcnn-v1"


class TcnnStage(Stage):
    name = "tcnn"
    export_prefix = "TCNN"
    metric_name = "val/cross_entropy"

    def __init__(self, config: Config, dist_info: DistInfo) -> None:
        super().__init__(config, dist_info)
        # Fresh weights (torch's default init): this stage is what produces the checkpoint.
        self.tcnn = build_tcnn_from_config(config, load_weights=False).to(self.device).train()
        self.models = {"tcnn": self.tcnn}
        self.model = self.wrap(self.tcnn)
        optimizer = adamw(trainable_parameters(self.tcnn), config.optim.tcnn_lr, config.optim, DEFAULT_BETAS)
        self.optimizers = {"tcnn": optimizer}
        self.schedulers = {"tcnn": multi_stage(optimizer, config.optim.tcnn_milestones, config.optim.tcnn_gamma)}

    def train_step(self, micro_batches: list[Batch]) -> dict[str, Tensor]:
        accum = len(micro_batches)
        self.zero_grad()
        total = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            batch = to_device(batch, self.device)
            with self.sync_gradients(self.model, index == accum - 1):
                with self.autocast():
                    logits = self.model(batch["image"])
                loss = F.cross_entropy(logits.float(), batch["class_id"]) / accum
                loss.backward()
            total += loss.detach()
            correct += (logits.argmax(1) == batch["class_id"]).float().mean().detach() / accum
        self.check_finite({"cross_entropy": total})
        clip_gradients(self.tcnn, self.config.optim.grad_clip)
        self.optimizers["tcnn"].step()
        self.schedulers["tcnn"].step()
        return {"tcnn/cross_entropy": total, "tcnn/accuracy": correct}

    @torch.no_grad()
    def validate(self, batches: Iterable[Batch], num_media: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
        self.tcnn.eval()
        loss_sum, correct, count = 0.0, 0, 0
        media: list[dict[str, Any]] = []
        for batch in batches:
            batch = to_device(batch, self.device)
            with self.autocast():
                logits = self.tcnn(batch["image"])
            logits = logits.float()
            labels = batch["class_id"]
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            predicted = logits.argmax(1)
            correct += int((predicted == labels).sum())
            count += labels.numel()
            for i in range(labels.numel()):
                if len(media) < num_media:
                    media.append({"image": batch["image"][i].cpu(),
                                  "predicted": CLASS_NAMES[int(predicted[i])], "label": CLASS_NAMES[int(labels[i])]})
        self.tcnn.train()
        count = max(count, 1)
        return {"val/cross_entropy": loss_sum / count, "val/error": 1.0 - correct / count}, media

    def export(self, path: Path, step: int) -> None:
        export_weights(self.tcnn.state_dict(), path, extra={
            "format": EXPORT_FORMAT, "tcnn": self.config.image.tcnn, "step": int(step),
            "git_commit": git_commit() or "",
        })
