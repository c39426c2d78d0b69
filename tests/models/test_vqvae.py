"""Jukebox VQ-VAE: names, sizes, numeric compatibility, loading, straight-through, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from compat import DATA, read_manifest, relative_error, seeded_state_dict
from torch import nn

from conchshell.errors import CheckpointError
from conchshell.models.vqvae import VQVAE, load_jukebox_checkpoint
from conchshell.utils.checkpoint import load_strict
from conchshell.utils.profile import count_params

MANIFEST = "jukebox_vqvae_keys.tsv"


@pytest.fixture(scope="module")
def seeded_model() -> VQVAE:
    model = VQVAE()
    load_strict(model, seeded_state_dict(MANIFEST, seed=1, gain=1.0), MANIFEST)
    return model.eval()


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    data = np.load(DATA / "vqvae_seed1.npz")
    return {key: torch.from_numpy(data[key]) for key in data.files}


def _small_vqvae(**overrides) -> VQVAE:
    hparams = dict(
        levels=2, downs_t=(2, 1), strides_t=(2, 2), emb_width=16, l_bins=32, width=8, depth=2,
        multipliers=(1, 1), sample_rate=16000,
    )
    hparams.update(overrides)
    return VQVAE(**hparams)


def test_state_dict_matches_the_official_manifest():
    model = VQVAE()
    state = model.state_dict()
    manifest = read_manifest(MANIFEST)
    assert list(state) == [key for key, _, _ in manifest]
    for key, shape, _ in manifest:
        assert tuple(state[key].shape) == shape, key
    assert count_params(model) == 1_485_763
    assert model.hop_lengths == (8, 32, 128)
    assert (model.levels, model.emb_width, model.l_bins) == (3, 64, 2048)


def test_seeded_weights_reproduce_reference_encodings_and_codes(seeded_model, reference):
    x = reference["x"].transpose(1, 2)  # Jukebox [B, T, 1] -> ours [B, 1, T]
    with torch.no_grad():
        for level in range(3):
            latent = seeded_model.encode(x, level)
            assert relative_error(latent, reference[f"xs{level}"]) < 1e-4
            assert torch.equal(seeded_model.quantize(latent, level), reference[f"z{level}"])


@pytest.mark.parametrize("level", [0, 2])
def test_seeded_weights_reproduce_reference_decodings(seeded_model, reference, level):
    with torch.no_grad():
        audio = seeded_model.decode(reference[f"z{level}"], level)
    assert audio.shape == (1, 1, 16000)
    assert relative_error(audio, reference[f"y{level}"].transpose(1, 2)) < 1e-4


def test_encode_runs_only_the_requested_level(seeded_model):
    calls = []
    hooks = [
        enc.register_forward_hook(lambda module, args, out, level=level: calls.append(level))
        for level, enc in enumerate(seeded_model.encoders)
    ]
    try:
        with torch.no_grad():
            latent = seeded_model.encode(torch.randn(2, 1, 1024), 2)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == [2]
    assert latent.shape == (2, 64, 8)


def test_shape_errors_are_explicit(seeded_model):
    with pytest.raises(ValueError, match="multiple of the level-2 hop 128"):
        seeded_model.encode(torch.randn(1, 1, 1000), 2)
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        seeded_model.encode(torch.randn(1, 1000), 0)
    with pytest.raises(ValueError, match="level must be in 0..2"):
        seeded_model.decode(torch.zeros(1, 4, dtype=torch.long), 3)


# ----------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def seeded_state() -> dict[str, torch.Tensor]:
    return seeded_state_dict(MANIFEST, seed=1, gain=1.0)


def _assert_loaded(model: VQVAE, state: dict[str, torch.Tensor]) -> None:
    assert not model.training and model.frozen
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.bottleneck[1].k, state["bottleneck.level_blocks.1.k"])
    assert torch.equal(model.decoders[0].out.weight, state["decoders.0.out.weight"])


def test_loads_official_layout_with_ddp_prefix(tmp_path, seeded_state):
    path = tmp_path / "vqvae.pth.tar"
    official = {"module." + k: v for k, v in seeded_state.items()}
    torch.save({"hps": {"sr": 44100, "levels": 3}, "step": 10, "model": official}, path)
    _assert_loaded(load_jukebox_checkpoint(path), seeded_state)


def test_loads_bare_state_dict(tmp_path, seeded_state):
    path = tmp_path / "vqvae_low.pt"
    torch.save(seeded_state, path)
    model = load_jukebox_checkpoint(path)
    _assert_loaded(model, seeded_state)
    assert model.bottleneck[0].initialised  # a loaded codebook is kept if training resumes


def test_mismatched_file_lists_missing_and_unexpected_keys(tmp_path, seeded_state):
    state = dict(seeded_state)
    del state["decoders.2.out.bias"]
    state["bottleneck.level_blocks.3.k"] = torch.zeros(2048, 64)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_jukebox_checkpoint(path)
    message = str(info.value)
    assert "wrong.pt" in message
    assert "missing" in message and "decoders.2.out.bias" in message
    assert "unexpected" in message and "bottleneck.level_blocks.3.k" in message


def test_garbage_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_jukebox_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_jukebox_checkpoint(tmp_path / "absent.pt")


def test_frozen_codec_stays_in_eval_mode_under_a_training_parent():
    parent = nn.ModuleDict({"codec": _small_vqvae().freeze(), "head": nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training
    assert not parent["codec"].training
    assert not any(m.training for m in parent["codec"].modules())


# ----------------------------------------------------------------------- straight-through
@pytest.mark.parametrize("level", [0, 1, 2])
def test_straight_through_gradient_reaches_the_latent_only(seeded_model, level):
    codec = seeded_model.freeze()
    latent = torch.randn(1, 64, 6, requires_grad=True)
    quantised, codes = codec.quantize_straight_through(latent, level)
    assert torch.equal(codes, codec.quantize(latent, level))
    assert torch.allclose(quantised, codec.dequantize(codes, level), atol=1e-6)  # ST adds rounding
    audio = codec.decode_latent(quantised, level)
    assert audio.shape == (1, 1, 6 * codec.hop_lengths[level])
    F.l1_loss(audio, torch.zeros_like(audio)).backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    assert all(p.grad is None for p in codec.parameters())
    assert all(not b.requires_grad for b in codec.buffers())


# -------------------------------------------------------------------------------- training
def _fixed_signal(length: int = 1024) -> torch.Tensor:
    t = torch.arange(length) / 16000
    tone = 0.5 * torch.sin(2 * torch.pi * 440 * t) + 0.25 * torch.sin(2 * torch.pi * 1250 * t)
    return torch.stack([tone, 0.8 * tone.roll(37)]).unsqueeze(1)  # [2, 1, T]


def test_training_reduces_reconstruction_loss_and_moves_the_codebook():
    torch.manual_seed(0)
    model = _small_vqvae().train()
    x = _fixed_signal()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step() -> tuple[float, dict]:
        out = model(x)
        recons = sum(F.mse_loss(y, x) for y in out["reconstructions"].values())
        commit = sum(out["commit_losses"].values())
        optimiser.zero_grad()
        (recons + 0.02 * commit).backward()
        optimiser.step()
        return recons.item(), out

    first, out = step()
    assert all(model.bottleneck[level].initialised for level in range(2))
    assert set(out["reconstructions"]) == {0, 1}
    assert out["reconstructions"][1].shape == x.shape
    assert out["latents"][0].shape == (2, 16, 256) and out["codes"][1].shape == (2, 128)
    assert {"fit", "pn", "entropy", "used_curr", "usage", "dk"} <= set(out["metrics"][0])
    codebook_after_init = model.bottleneck[0].k.clone()
    for _ in range(40):
        last, out = step()
    assert last < 0.5 * first
    assert not torch.equal(model.bottleneck[0].k, codebook_after_init)
    assert all(p.grad is not None for p in model.encoders[0].parameters())


def test_forward_on_selected_levels_and_dead_code_restart():
    torch.manual_seed(1)
    model = _small_vqvae().train()
    x = _fixed_signal()
    model(x, levels=[0])
    assert model.bottleneck[0].initialised and not model.bottleneck[1].initialised
    quantizer = model.bottleneck[0]
    quantizer.k[7] = 1e4  # far from every latent: never chosen, so it must be restarted
    quantizer.k_elem[7] = 1.0
    with torch.no_grad():
        rows = model.encode(x, 0).permute(0, 2, 1).reshape(-1, 16)  # 512 rows >= 32 codes: no noise
    out = model(x, levels=[0])
    assert list(out["reconstructions"]) == [0]
    assert 7 not in out["codes"][0]
    assert bool((rows == quantizer.k[7]).all(dim=1).any())


def test_eval_forward_does_not_touch_the_codebook():
    torch.manual_seed(2)
    model = _small_vqvae().train()
    model(_fixed_signal())
    model.eval()
    before = [q.k.clone() for q in model.bottleneck.level_blocks]
    model(_fixed_signal())
    assert all(torch.equal(q.k, b) for q, b in zip(model.bottleneck.level_blocks, before))


def test_training_is_deterministic_and_statistics_round_trip():
    codebooks = []
    for _ in range(2):
        torch.manual_seed(3)
        model = _small_vqvae().train()
        model(_fixed_signal())
        model(_fixed_signal())
        codebooks.append(model.bottleneck[1].k.clone())
    assert torch.equal(*codebooks)
    resumed = _small_vqvae()
    resumed.load_state_dict(model.state_dict())
    resumed.load_codebook_statistics(model.codebook_statistics())
    assert torch.equal(resumed.bottleneck[1].k_elem, model.bottleneck[1].k_elem)
    assert resumed.bottleneck[1].initialised


def test_cpu_without_process_group_or_cuda(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the codec must not touch CUDA or torch.distributed here")

    for name in ("is_initialized", "get_rank", "get_world_size", "all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, forbidden)
    monkeypatch.setattr(torch.cuda, "is_available", forbidden)
    monkeypatch.setattr(torch.cuda, "current_device", forbidden)
    monkeypatch.setattr(torch.Tensor, "cuda", forbidden)
    monkeypatch.setattr(nn.Module, "cuda", forbidden)
    model = VQVAE().eval()
    with torch.no_grad():
        for level in range(3):
            latent = model.encode(torch.randn(1, 1, 256), level)
            codes = model.quantize(latent, level)
            assert model.decode(codes, level).shape == (1, 1, 256)
