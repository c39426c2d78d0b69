"""InceptionI3d: name/shape compatibility with the official checkpoint, numerical agreement
with the reference implementation (seeded weights), the loader and the freezing rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compat import DATA, read_manifest, relative_error, seeded_input, seeded_state_dict
from conchshell.errors import CheckpointError
from conchshell.models.i3d import (
    I3D_EMBEDDING_DIM,
    InceptionI3d,
    MaxPool3dSamePadding,
    Unit3D,
    freeze_i3d,
    i3d_embedding,
    load_i3d_checkpoint,
    pad_same_3d,
    same_padding,
    seeded_i3d,
    separable_max_pool3d,
)
from conchshell.nn.direct import direct_convolutions
from conchshell.utils.checkpoint import load_strict
from conchshell.utils.profile import count_macs, count_params
from conchshell.utils.seeded import seeded_state_dict_for

MANIFEST = "i3d_rgb_keys.tsv"
NBT = "num_batches_tracked"


def official_like_state() -> dict[str, torch.Tensor]:
    """Seeded weights laid out like rgb_imagenet.pt: no num_batches_tracked buffers."""
    return {k: v for k, v in seeded_state_dict(MANIFEST, 1, 2.0).items() if not k.endswith(NBT)}


@pytest.fixture(scope="module")
def reference_run():
    """One full-size pass through a seeded I3D, shared by the comparison tests."""
    model = InceptionI3d()
    load_strict(model, official_like_state(), "compat seeded weights", optional_suffixes=(NBT,))
    freeze_i3d(model)  # as ConchShell runs it (BatchNorm folded into the convolutions)
    video = seeded_input((1, 3, 18, 224, 224), 1)
    with torch.no_grad():
        features = model.extract_features(video)
        logits = model(video)
        embedding = i3d_embedding(model, video)
    return features, logits, embedding


def test_state_dict_equals_manifest_in_order():
    state = InceptionI3d().state_dict()
    manifest = read_manifest(MANIFEST)
    assert list(state) == [name for name, _, _ in manifest]
    for name, shape, dtype in manifest:
        assert tuple(state[name].shape) == shape, name
        assert state[name].is_floating_point() == (dtype == "float"), name
    assert sum(name.endswith(NBT) for name in state) == 57


def test_parameter_count():
    # DESIGN.md: 12.70M parameters (measured on the reference implementation).
    assert count_params(InceptionI3d()) == 12_697_264


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [(224, 7, 2, (2, 3)), (18, 7, 2, (2, 3)), (112, 3, 2, (0, 1)), (9, 3, 2, (1, 1)), (5, 2, 2, (0, 1)), (7, 1, 1, (0, 0))],
)
def test_same_padding_values(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


def test_same_padding_gives_ceil_output_length():
    for size in range(1, 20):
        for kernel in range(1, 8):
            for stride in range(1, 4):
                before, after = same_padding(size, kernel, stride)
                out = (size + before + after - kernel) // stride + 1
                assert out == math.ceil(size / stride), (size, kernel, stride)
                assert 0 <= after - before <= 1


@pytest.mark.parametrize("kernel, stride, size", [
    ((3, 3, 3), (1, 1, 1), (5, 9, 9)),   # symmetric: the conv pads by itself
    ((1, 1, 1), (1, 1, 1), (5, 9, 9)),   # no padding at all
    ((7, 7, 7), (2, 2, 2), (6, 10, 9)),  # asymmetric in T and H, symmetric in W
    ((3, 3, 3), (2, 2, 2), (6, 10, 10)),  # asymmetric everywhere: explicit zero pad
])
def test_unit3d_equals_explicit_same_padding(kernel, stride, size):
    torch.manual_seed(0)
    unit = Unit3D(3, 4, kernel, stride, use_batch_norm=False, use_bias=True, use_relu=False)
    x = torch.randn(2, 3, *size)
    expected = unit.conv3d(pad_same_3d(x, kernel, stride))
    assert expected.shape[2:] == tuple(math.ceil(n / s) for n, s in zip(size, stride))
    torch.testing.assert_close(unit(x), expected, rtol=1e-5, atol=1e-5)


def test_pad_same_3d_returns_input_when_nothing_to_pad():
    x = torch.randn(1, 2, 3, 4, 5)
    assert pad_same_3d(x, (1, 1, 1), (1, 1, 1)) is x


def test_max_pool_keeps_input_dtype_under_autocast():
    # Pooling is exact in bf16: it must not be cast to fp32 by CPU autocast.
    pool = MaxPool3dSamePadding((3, 3, 3), (2, 2, 2))
    x = torch.rand(1, 8, 5, 9, 9).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = pool(x)
    assert pooled.dtype == torch.bfloat16
    assert torch.equal(pooled.float(), pool(x.float()))


@pytest.mark.parametrize("shape, kernel, stride", [
    ((2, 64, 9, 113, 113), (1, 3, 3), (1, 2, 2)),  # the stem's pools
    ((1, 16, 11, 30, 30), (3, 3, 3), (1, 1, 1)),   # an Inception block's branch pool
    ((1, 8, 11, 29, 29), (3, 3, 3), (2, 2, 2)),
    ((1, 8, 5, 9, 9), (2, 2, 2), (2, 2, 2)),
    ((1, 5, 4, 7, 6), (2, 1, 3), (1, 2, 1)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_separable_max_pool_is_bit_identical(shape, kernel, stride, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    x[0, 0, 0, :2, :2] = 0.5  # ties
    pooled = separable_max_pool3d(x, kernel, stride)
    assert torch.equal(pooled, F.max_pool3d(x, kernel, stride))
    assert pooled.is_contiguous(memory_format=torch.channels_last_3d)



@pytest.mark.parametrize("shape", [(1, 4, 9, 112, 112), (1, 3, 9, 28, 28), (2, 3, 5, 15, 14), (1, 2, 3, 7, 7),
                                   (1, 2, 1, 2, 3), (1, 1, 2, 1, 1)])
@pytest.mark.parametrize("kernel, stride", [((1, 3, 3), (1, 2, 2)), ((3, 3, 3), (1, 1, 1)),
                                            ((3, 3, 3), (2, 2, 2)), ((2, 2, 2), (2, 2, 2)), ((2, 3, 1), (3, 1, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_separable_max_pool_pads_with_zeros_without_a_padded_copy(shape, kernel, stride, dtype):
    # Negative inputs too: the padding's zero wins at the edges exactly as in the padded pool.
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last_3d)
    paddings = [same_padding(size, k, s) for size, k, s in zip(shape[2:], kernel, stride)]
    pooled = separable_max_pool3d(x, kernel, stride, paddings)
    assert torch.equal(pooled, F.max_pool3d(pad_same_3d(x, kernel, stride), kernel, stride))
    assert pooled.is_contiguous(memory_format=torch.channels_last_3d) or pooled.numel() == pooled.shape[1]
    with torch.inference_mode():
        assert torch.equal(MaxPool3dSamePadding(kernel, stride)(x), pooled)


def test_separable_max_pool_with_padding_wider_than_any_tap_reaches():
    # No tap reads every output: that axis is pooled from a padded copy.
    x = torch.randn(1, 2, 4, 5, 6)
    pooled = separable_max_pool3d(x, (3, 3, 3), (1, 1, 2), ((2, 2), (1, 1), (2, 1)))
    assert torch.equal(pooled, F.max_pool3d(F.pad(x, (2, 1, 1, 1, 2, 2)), (3, 3, 3), (1, 1, 2)))

def test_max_pool_with_gradients_gives_each_window_one_winner():
    # On ties torch.maximum would share the gradient: the autograd path keeps max_pool3d's.
    x = torch.zeros(1, 1, 1, 3, 3, requires_grad=True)
    MaxPool3dSamePadding((1, 3, 3), (1, 1, 1))(x)[0, 0, 0, 1, 1].backward()
    assert x.grad.sum() == 1 and x.grad.count_nonzero() == 1


def test_stem_on_distinct_frames_equals_the_repeated_clip():
    model = freeze_i3d(seeded_i3d(1))
    frames = seeded_input((1, 3, 6, 224, 224), 2).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = i3d_embedding(model, frames.repeat_interleave(3, dim=2))
        got = i3d_embedding(model, frames, frame_repeats=3)
    assert got.shape == (1, I3D_EMBEDDING_DIM)
    assert relative_error(got, expected) < 1e-5


def test_extract_features_matches_reference(reference_run):
    features, _, _ = reference_run
    expected = torch.from_numpy(np.load(DATA / "i3d_seed1_features.npy"))
    assert features.shape == (1, 1024, 2, 1, 1)
    assert relative_error(features, expected) < 1e-4


def test_forward_logits_match_reference(reference_run):
    _, logits, _ = reference_run
    expected = torch.from_numpy(np.load(DATA / "i3d_seed1_logits.npy"))
    assert logits.shape == (1, 400, 2)
    assert relative_error(logits, expected) < 1e-4


def test_embedding_is_channel_major_flattening(reference_run):
    features, _, embedding = reference_run
    assert embedding.shape == (1, I3D_EMBEDDING_DIM)
    for c, t in [(0, 0), (0, 1), (517, 0), (1023, 1)]:
        assert embedding[0, c * 2 + t] == features[0, c, t, 0, 0]


def test_embedding_refuses_train_mode():
    model = InceptionI3d()
    with pytest.raises(ValueError, match="eval mode"):
        i3d_embedding(model, torch.zeros(1, 3, 8, 32, 32))


def test_seeded_i3d_equals_compat_rule():
    model = seeded_i3d(1)
    expected = seeded_state_dict(MANIFEST, 1, 2.0)
    state = model.state_dict()
    assert list(state) == list(expected)
    for name, value in expected.items():
        assert state[name].dtype == value.dtype, name
        assert torch.equal(state[name], value), name
    assert model.frozen and not model.training
    assert not seeded_i3d(2).state_dict()["Mixed_5c.b0.conv3d.weight"].equal(state["Mixed_5c.b0.conv3d.weight"])


def test_seeded_state_dict_for_follows_module_dtypes_and_names():
    module = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    state = seeded_state_dict_for(module, seed=5, gain=1.0)
    assert list(state) == list(module.state_dict())
    assert state["0.weight"].dtype == torch.float64
    assert state["1.num_batches_tracked"].dtype == torch.long and state["1.num_batches_tracked"] == 0
    assert (state["1.running_var"] >= 0.5).all()
    # Per-name generators: the same name gets the same draw in any module.
    alone = seeded_state_dict_for(nn.Sequential(nn.Linear(4, 3)), seed=5, gain=1.0)
    assert torch.equal(alone["0.weight"].double(), state["0.weight"])


def test_loader_accepts_bare_official_layout(tmp_path):
    path = tmp_path / "rgb_imagenet.pt"
    state = official_like_state()
    torch.save(state, path)
    model = load_i3d_checkpoint(path)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert model.frozen and not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_loader_accepts_wrapped_dataparallel_checkpoint(tmp_path):
    path = tmp_path / "wrapped.pt"
    state = official_like_state()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    loaded = load_i3d_checkpoint(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_loader_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "not_i3d.pt"
    state = official_like_state()
    state["Mixed_4c.b9.conv3d.weight"] = state.pop("Mixed_4c.b1b.conv3d.weight")
    state["head.fc.weight"] = torch.zeros(2, 2)
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_i3d_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "1 missing" in message and "Mixed_4c.b1b.conv3d.weight" in message
    assert "2 unexpected" in message and "Mixed_4c.b9.conv3d.weight" in message and "head.fc.weight" in message


def test_loader_reports_wrong_number_of_classes(tmp_path):
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(official_like_state(), path)
    with pytest.raises(CheckpointError, match="wrong shape.*logits.conv3d.weight"):
        load_i3d_checkpoint(path, num_classes=10)


def test_loader_rejects_non_torch_and_non_dict_files(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_i3d_checkpoint(garbage)
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(CheckpointError, match="tensor.pt"):
        load_i3d_checkpoint(tensor_file)


class _Parent(nn.Module):
    """A trainable module that owns a frozen I3D, like the GAN wrapper will."""

    def __init__(self, i3d: InceptionI3d) -> None:
        super().__init__()
        self.i3d = i3d
        self.head = nn.Linear(4, 4)



def _unit_with_statistics(kernel=(3, 3, 3), stride=(1, 1, 1)) -> Unit3D:
    torch.manual_seed(0)
    unit = Unit3D(4, 6, kernel, stride, use_bias=True)
    bn = unit.bn
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
    return unit


@pytest.mark.parametrize("kernel, stride", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 2, 2))])
def test_frozen_unit_folds_its_batch_norm_into_the_convolution(kernel, stride):
    unit = _unit_with_statistics(kernel, stride)
    x = torch.randn(2, 4, 5, 9, 9)
    expected = F.relu(unit.bn.eval()(unit.conv3d(pad_same_3d(x, kernel, stride))))
    unit.requires_grad_(False).eval()
    assert unit.folds_batch_norm()
    with torch.inference_mode():
        got = unit(x)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)
    with direct_convolutions():  # the plain form: BatchNorm as its own layer
        assert not unit.folds_batch_norm()
        torch.testing.assert_close(unit(x), expected.detach(), rtol=1e-5, atol=1e-5)


def test_batch_norm_is_not_folded_while_it_or_the_convolution_trains():
    unit = _unit_with_statistics()
    assert not unit.folds_batch_norm()          # train mode: batch statistics
    assert not unit.eval().folds_batch_norm()   # weights still trainable
    unit.conv3d.requires_grad_(False)
    assert not unit.folds_batch_norm()          # the BatchNorm's affine still trainable
    unit.bn.requires_grad_(False)
    assert unit.folds_batch_norm()


def test_folded_weights_follow_new_statistics():
    unit = _unit_with_statistics().requires_grad_(False).eval()
    x = torch.randn(1, 4, 3, 6, 6)
    with torch.no_grad():
        unit(x)
        state = {k: v.clone() for k, v in unit.state_dict().items()}
        state["bn.running_mean"] += 1.0
        unit.load_state_dict(state)
        expected = F.relu(unit.bn(unit.conv3d(pad_same_3d(x, (3, 3, 3), (1, 1, 1)))))
        torch.testing.assert_close(unit(x), expected, rtol=1e-5, atol=1e-5)


def test_relu_stays_out_of_place_for_an_input_that_needs_gradients():
    unit = _unit_with_statistics().eval()
    x = torch.randn(1, 4, 3, 6, 6, requires_grad=True)
    unit(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

@pytest.mark.parametrize("construct", ["freeze_i3d", "frozen=True"])
def test_freezing_survives_parent_train(construct):
    i3d = freeze_i3d(InceptionI3d()) if construct == "freeze_i3d" else InceptionI3d(frozen=True)
    parent = _Parent(i3d)
    parent.train()
    assert parent.training and parent.head.training
    assert not any(m.training for m in i3d.modules())
    assert not any(p.requires_grad for p in i3d.parameters())

    # Running statistics stay put and the output is the eval-mode one.
    bn = i3d.Conv3d_1a_7x7.bn
    before = bn.running_mean.clone()
    video = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    out = i3d.backbone(video)
    assert out.shape == (2, 1024, 1, 2, 2)
    assert torch.equal(bn.running_mean, before)
    assert bn.num_batches_tracked == 0


def test_unfrozen_model_trains_normally():
    model = InceptionI3d()
    model.eval()
    model.train()
    assert model.training and model.Mixed_5c.b0.bn.training and not model.frozen


@pytest.mark.heavy
def test_macs_at_paper_size():
    # DESIGN.md: about 32 G-MACs for extract_features at [1,3,18,224,224] (measured).
    macs = count_macs(seeded_i3d(1).extract_features, seeded_input((1, 3, 18, 224, 224), 1))
    assert macs == 32_013_391_872
