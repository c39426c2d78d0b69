"""TCNN-6 / TCNN-18: sizes against the paper, both forward paths, and the shared interface."""
from __future__ import annotations

import pytest
import torch

import conchshell.models.tcnn as tcnn_module
from conchshell.errors import ConfigError
from conchshell.models.tcnn import TCNN, TCNN6, TCNN18, build_tcnn
from conchshell.utils.profile import count_macs, count_params

TCNN6_WIDTHS = [16, 32, 64, 128, 256, 128]
TCNN18_WIDTHS = [w for w in (16, 32, 64, 128, 256, 512) for _ in range(3)]


def _seeded(model: TCNN, seed: int = 0) -> TCNN:
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_tcnn6_matches_paper_params_and_macs() -> None:
    model = TCNN6().eval()
    assert count_params(model) == 2_284_686
    assert count_macs(model, torch.zeros(1, 3, 224, 224)) == 827_507_200


def test_tcnn18_params_and_macs_are_the_documented_ones() -> None:
    # Counted on the meta device: the numbers only depend on shapes, and it is instant.
    with torch.device("meta"):
        model = TCNN18().eval()
        image = torch.empty(1, 3, 224, 224)
    assert count_params(model) == 7_867_782
    assert count_macs(model, image) == 1_697_958_912
    # The module docstring states these figures; keep it honest if the network changes.
    assert "7,867,782" in tcnn_module.__doc__ and "1,697,958,912" in tcnn_module.__doc__


@pytest.mark.parametrize("cls", [TCNN6, TCNN18])
def test_forward_gives_logits_per_class(cls: type[TCNN]) -> None:
    model = _seeded(cls(num_classes=6))
    logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 6)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


# TCNN18's head pools globally, so a 64x64 image (the smallest that survives six
# poolings) exercises the same layers as 224x224 at a twelfth of the cost.
@pytest.mark.parametrize("cls, size", [(TCNN6, 224), (TCNN18, 64)])
def test_logits_are_not_squashed_by_a_sigmoid(cls: type[TCNN], size: int) -> None:
    model = cls().eval()
    last = model.head[-1]
    assert isinstance(last, torch.nn.Linear)
    bias = torch.tensor([-3.0, 0.5, 2.0, 7.0, -1.0, 4.0])
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(bias)
    images = torch.randn(3, 3, size, size)
    torch.testing.assert_close(model(images), bias.expand(3, 6))
    assert model.predict_class(images).tolist() == [3, 3, 3]


def test_predict_class_is_argmax_of_logits() -> None:
    model = _seeded(TCNN6(), seed=3)
    images = torch.randn(4, 3, 224, 224)
    predicted = model.predict_class(images)
    assert predicted.dtype == torch.long and predicted.shape == (4,)
    assert torch.equal(predicted, model(images).argmax(dim=1))


def test_eval_is_deterministic_and_train_uses_dropout() -> None:
    model = _seeded(TCNN6(), seed=1)
    images = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(model(images), model(images))
    model.train()
    torch.manual_seed(0)
    first = model(images)
    torch.manual_seed(1)
    assert not torch.allclose(first, model(images))


def test_classifier_trains_end_to_end() -> None:
    model = TCNN6().train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.tensor([0, 5]))
    loss.backward()
    for conv in model.convs:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cls, widths, size", [(TCNN6, TCNN6_WIDTHS, 224), (TCNN18, TCNN18_WIDTHS, 24)])
def test_time_features_are_the_bare_conv_chain(cls: type[TCNN], widths: list[int], size: int) -> None:
    model = _seeded(cls(), seed=2)
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        blocks = model.time_features(image)
        assert [b.shape[1] for b in blocks] == widths
        assert all(b.shape == (1, widths[i], size, size) for i, b in enumerate(blocks))
        # Each block is the previous one through the next conv, with no activation or pooling.
        previous = image
        for conv, block in zip(model.convs, blocks):
            torch.testing.assert_close(block, conv(previous))
            previous = block
    assert (blocks[-1] < 0).any(), "a ReLU would leave no negative values"


def test_frames_per_block_give_eighteen_frames() -> None:
    assert TCNN6.frames_per_block == 3 and TCNN6().num_frames == 18
    assert TCNN18.frames_per_block == 1 and TCNN18().num_frames == 18


def test_build_tcnn_by_name() -> None:
    assert type(build_tcnn("tcnn6")) is TCNN6
    assert type(build_tcnn("TCNN-18", num_classes=4)) is TCNN18
    assert build_tcnn("tcnn18", num_classes=4).head[-1].out_features == 4
    with pytest.raises(ConfigError, match="'vgg16'"):
        build_tcnn("vgg16")
    with pytest.raises(ConfigError):
        TCNN6(num_classes=0)


@pytest.mark.heavy
def test_tcnn18_time_features_at_full_size() -> None:
    model = TCNN18().eval()
    with torch.no_grad():
        blocks = model.time_features(torch.randn(1, 3, 224, 224))
    assert [tuple(b.shape) for b in blocks] == [(1, w, 224, 224) for w in TCNN18_WIDTHS]
