"""The optimisers the stages build."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conchshell.config import OptimConfig
from conchshell.errors import ConfigError
from conchshell.training.optim import adamw


def test_adamw_is_fused_and_steps_like_the_plain_update():
    torch.manual_seed(0)
    fused_model, plain_model = nn.Linear(16, 8), nn.Linear(16, 8)
    plain_model.load_state_dict(fused_model.state_dict())
    optim = OptimConfig()
    fused = adamw(fused_model.parameters(), 1e-3, optim)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-3, betas=tuple(optim.betas), eps=optim.eps,
                              weight_decay=optim.weight_decay)
    assert fused.param_groups[0]["fused"]
    x = torch.randn(4, 16)
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            optimizer.step()
    for got, expected in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(got, expected)


def test_adamw_rejects_what_it_cannot_optimise():
    with pytest.raises(ConfigError, match="nothing to optimise"):
        adamw([], 1e-3, OptimConfig())
    with pytest.raises(ConfigError, match="learning rate"):
        adamw(nn.Linear(2, 2).parameters(), 0.0, OptimConfig())
