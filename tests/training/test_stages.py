"""The stages' step functions in process: DDP gradient equivalence, accumulation, loss
wiring (wave/mel through the straight-through quantiser), schedules and the data order."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from conchshell.config import load_config
from conchshell.errors import ConfigError
from conchshell.nn.losses import discriminator_hinge_loss, feature_matching_loss, generator_hinge_loss
from conchshell.training.distributed import DistInfo, cleanup_distributed, setup_distributed
from conchshell.training.optim import gan_optimisers, multi_stage
from conchshell.training.stages import NonFiniteLossError, build_stage
from conchshell.training.stages import gan as gan_stage_module
from conchshell.training.trainer import ResumableSampler

from .conftest import REPO

CPU = DistInfo(rank=0, local_rank=0, world_size=1, is_main=True, device=torch.device("cpu"), backend=None)
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "SLURM_NTASKS")


def tiny(*overrides: str):
    return load_config(REPO / "configs/tiny.yaml", ["train.device=cpu", *overrides])


def synthetic_batch(config, size: int = 2) -> dict[str, torch.Tensor]:
    """A batch as the feature cache delivers it: no frontend needed."""
    generator = torch.Generator().manual_seed(7)
    return {
        "features": torch.randn(size, 2048, generator=generator),
        "pred_class": torch.tensor([3, 5][:size]),
        "class_id": torch.tensor([1, 4][:size]),
        "audio": (0.3 * torch.randn(size, 1, config.clip_samples, generator=generator)).clamp(-1, 1),
        "image": torch.zeros(size, 3, 4, 4),
        "index": torch.arange(size),
    }


def take(batch: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {key: value[rows] for key, value in batch.items()}


def generator_grads(stage) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in stage.generator.named_parameters() if p.grad is not None}


def assert_same_gradients(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every parameter's gradient equal up to float rounding (relative L2 error < 1e-5)."""
    assert actual.keys() == expected.keys() and len(expected) > 0
    for name in expected:
        error = float((actual[name] - expected[name]).norm() / expected[name].norm().clamp_min(1e-30))
        assert error < 1e-5, f"{name}: relative gradient error {error:.2e}"


def fresh_gan_stage(config, dist_info=CPU):
    torch.manual_seed(config.train.seed)  # what the trainer does: same init on every rank
    return build_stage(config, dist_info)


def use_float64_generator() -> None:
    """Build GAN stages with a float64 generator.

    The generator max-pools: in float32 the rounding differences between a batch of 2 and
    two batches of 1 (different conv kernels) flip a few argmaxes, which moves whole
    gradient entries (up to ~30 % in the first layers, also between 1 and 2 threads). In
    float64 those flips vanish, so the comparison below tests the DDP/accumulation
    arithmetic and nothing else.
    """
    original = gan_stage_module.build_generator_from_config
    if getattr(original, "float64", False):
        return

    def build(config):
        return original(config).double()

    build.float64 = True
    gan_stage_module.build_generator_from_config = build


def _ddp_worker(rank: int, port: int, world_size: int, out_path: str, overrides: tuple[str, ...]) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = setup_distributed("cpu")
    try:
        use_float64_generator()
        config = tiny(*overrides)
        stage = fresh_gan_stage(config, info)
        stage.train_step([take(synthetic_batch(config), slice(rank, rank + 1))])
        if rank == 0:
            torch.save(generator_grads(stage), out_path)
    finally:
        cleanup_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def float64_generator(monkeypatch):
    monkeypatch.setattr(gan_stage_module, "build_generator_from_config",
                        gan_stage_module.build_generator_from_config)  # restored after the test
    use_float64_generator()


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


# The auxiliary classifier's heads run outside the discriminator's DDP forward; their
# gradients must still be averaged over ranks (the generator's gradients depend on them).
@pytest.mark.parametrize("overrides", [(), ("discriminator.auxiliary_classifier=true", "loss.lambda_class=1")],
                         ids=["paper", "auxiliary_classifier"])
def test_two_ranks_batch_one_give_the_gradients_of_one_rank_batch_two(tmp_path, no_launcher, float64_generator,
                                                                     overrides):
    config = tiny(*overrides)
    single = fresh_gan_stage(config)
    single.train_step([synthetic_batch(config)])
    expected = generator_grads(single)

    out = tmp_path / "ddp_grads.pt"
    mp.spawn(_ddp_worker, args=(_free_port(), 2, str(out), overrides), nprocs=2, join=True)
    actual = torch.load(out, weights_only=True)
    assert_same_gradients(actual, expected)


def test_gradient_accumulation_matches_the_full_batch(float64_generator):
    config = tiny()
    full = fresh_gan_stage(config)
    full.train_step([synthetic_batch(config)])
    accumulated = fresh_gan_stage(config)
    batch = synthetic_batch(config)
    losses = accumulated.train_step([take(batch, slice(0, 1)), take(batch, slice(1, 2))])
    assert set(losses) >= {"d/loss", "g/loss", "g/adversarial", "g/feature_matching", "g/wave", "g/mel"}
    assert_same_gradients(generator_grads(accumulated), generator_grads(full))


WAVE_MEL_ONLY = ("loss.lambda_g=0", "loss.lambda_fm=0", "loss.lambda_latent=0", "loss.lambda_quantized_latent=0",
                 "loss.lambda_wave=40", "loss.lambda_mel=15")


@pytest.mark.parametrize("straight_through", [True, False])
def test_wave_and_mel_losses_train_the_generator_only_through_the_straight_through_quantiser(straight_through):
    config = tiny(*WAVE_MEL_ONLY, f"loss.straight_through={str(straight_through).lower()}")
    stage = fresh_gan_stage(config)
    before = {k: v.clone() for k, v in stage.generator.state_dict().items()}
    d_before = {k: v.clone() for k, v in stage.discriminator.state_dict().items()}
    losses = stage.train_step([synthetic_batch(config)])
    assert set(losses) == {"d/loss", "g/loss", "g/wave", "g/mel"}  # zero-weight terms not computed
    changed = [k for k, v in stage.generator.state_dict().items() if not torch.equal(v, before[k])]
    if straight_through:
        assert changed, "wave/mel losses did not reach the generator"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.generator.parameters())
    else:
        # The released code's behaviour: argmin codes decoded under no_grad train nothing.
        assert not changed
    # The discriminator trains either way.
    assert any(not torch.equal(v, d_before[k]) for k, v in stage.discriminator.state_dict().items())


def test_conditional_discriminator_sees_labels_for_real_and_the_generated_class_for_fake():
    config = tiny("image.train_class_source=tcnn", "discriminator.class_conditional=true",
                  "loss.lambda_commitment=2")
    stage = fresh_gan_stage(config)
    seen = []
    for module in (stage.discriminator,):
        original = module.forward
        module.forward = lambda latent, class_ids, original=original: seen.append(class_ids.tolist()) or original(
            latent, class_ids)
    projections = [scale.class_projection.weight for scale in stage.discriminator.scales]
    before = [w.clone() for w in projections]
    losses = stage.train_step([synthetic_batch(config)])
    # label [1, 4] for the real latents, the TCNN's [3, 5] for the fakes: D phase (one joint
    # forward), then G phase (the fakes; feature matching reuses the D phase's reals).
    assert seen == [[1, 4, 3, 5], [3, 5]]
    assert "g/commitment" in set(losses)
    assert all(not torch.equal(w, b) for w, b in zip(projections, before))


def test_auxiliary_classifier_learns_real_labels_and_asks_the_generator_for_its_class():
    config = tiny("image.train_class_source=tcnn", "discriminator.auxiliary_classifier=true", "loss.lambda_class=1")
    stage = fresh_gan_stage(config)
    batch = synthetic_batch(config)
    features, classes = stage.conditioning(batch, "tcnn")
    fake = stage.generator(features, classes).detach()
    real = stage.real_latent(batch["audio"])
    # Discriminator: hinge plus the head's cross-entropy on the real latents and their labels.
    real_out = stage.judge(stage.discriminator, real, batch["class_id"])
    fake_out = stage.judge(stage.discriminator, fake, classes)
    expected = (discriminator_hinge_loss(real_out, fake_out)
                + F.cross_entropy(stage.discriminator.class_logits(real_out), batch["class_id"]))
    loss, real_features = stage.discriminator_loss(real, fake, batch["class_id"], classes)
    torch.testing.assert_close(loss, expected)
    # Generator: the head's cross-entropy on the fakes against the TCNN's classes [3, 5].
    terms = stage.generator_terms(fake, real, batch["audio"], real_features, classes)
    torch.testing.assert_close(terms["class"], F.cross_entropy(stage.discriminator.class_logits(fake_out), classes))
    heads = [scale.class_head.weight for scale in stage.discriminator.scales]
    before = [w.clone() for w in heads]
    losses = stage.train_step([batch])
    assert "g/class" in losses
    assert all(not torch.equal(w, b) for w, b in zip(heads, before))


def test_feature_matching_reads_the_discriminator_phases_real_outputs_from_before_its_update():
    # MelGAN's recipe: the reals are judged once, in the discriminator's phase; the generator
    # phase judges only the fakes, with the updated discriminator.
    stage = fresh_gan_stage(tiny())
    batch = synthetic_batch(stage.config)
    features, classes = stage.conditioning(batch, "label")
    real = stage.real_latent(batch["audio"])
    fake = stage.generator(features, classes).detach()
    _, real_features = stage.discriminator_loss(real, fake, batch["class_id"], classes)
    with torch.no_grad():
        expected_real = stage.judge(stage.discriminator, real, batch["class_id"])
    for got, expected in zip(real_features, expected_real):
        for got_map, expected_map in zip(got, expected):
            assert not got_map.requires_grad and got_map._base is None  # detached copies, not views
            torch.testing.assert_close(got_map, expected_map)
    # In train_step: one joint forward (4 items) and one of the fakes (2), even with feature matching on.
    calls = []
    stage.discriminator.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    losses = stage.train_step([batch])
    assert "g/feature_matching" in losses and calls == [4, 2]


def test_generator_terms_match_the_joint_forwards_values_and_gradients():
    config = tiny()
    stage = fresh_gan_stage(config)
    stage.discriminator.requires_grad_(False)
    batch = synthetic_batch(config)
    features, classes = stage.conditioning(batch, "label")
    real = stage.real_latent(batch["audio"])
    fake = stage.generator(features, classes).detach().requires_grad_(True)
    with torch.no_grad():
        real_features = stage.judge(stage.discriminator, real, batch["class_id"])
    terms = stage.generator_terms(fake, real, batch["audio"], real_features, classes)
    (terms["adversarial"] + terms["feature_matching"]).backward()
    got = fake.grad.clone()
    fake.grad = None
    joint = stage.judge(stage.discriminator, torch.cat([real, fake]), torch.cat([batch["class_id"], classes]))
    real_out, fake_out = gan_stage_module.split_scales(joint, real.shape[0])
    expected = {"adversarial": generator_hinge_loss(fake_out),
                "feature_matching": feature_matching_loss(real_out, fake_out)}
    sum(expected.values()).backward()
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value)
    torch.testing.assert_close(got, fake.grad)
    with pytest.raises(ValueError, match="real latents' discriminator outputs"):
        stage.generator_terms(fake, real, batch["audio"], None, classes)


def test_bf16_on_a_cpu_without_bf16_kernels_trains_in_fp32_and_says_so(as_if_no_bf16_kernels):
    with pytest.warns(UserWarning, match="train.precision bf16: this CPU has no bf16 kernels .*; training in fp32"):
        stage = fresh_gan_stage(tiny("train.precision=bf16"))
    assert not stage.use_bf16
    batch = synthetic_batch(stage.config)
    outputs = stage.judge(stage.discriminator, stage.real_latent(batch["audio"]), batch["class_id"])
    assert all(t.dtype == torch.float32 for scale in outputs for t in scale)


def test_bf16_judge_keeps_feature_maps_in_bf16_and_gives_float32_scores(as_if_bf16_kernels):
    stage = fresh_gan_stage(tiny("train.precision=bf16"))
    batch = synthetic_batch(stage.config)
    real = stage.real_latent(batch["audio"])
    outputs = stage.judge(stage.discriminator, real, batch["class_id"])
    assert all(t.dtype == torch.bfloat16 for scale in outputs for t in scale[:-1])
    assert all(scale[-1].dtype == torch.float32 for scale in outputs)
    losses = stage.train_step([batch])
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in losses.values())


def test_no_real_features_are_kept_without_feature_matching():
    stage = fresh_gan_stage(tiny("loss.lambda_fm=0"))
    batch = synthetic_batch(stage.config)
    features, classes = stage.conditioning(batch, "label")
    real = stage.real_latent(batch["audio"])
    fake = stage.generator(features, classes)
    _, real_features = stage.discriminator_loss(real, fake, batch["class_id"], classes)
    assert real_features is None
    assert "g/feature_matching" not in stage.train_step([batch])


def test_class_loss_needs_the_auxiliary_classifier():
    with pytest.raises(ConfigError, match="auxiliary_classifier"):
        fresh_gan_stage(tiny("loss.lambda_class=1"))


def test_commitment_pulls_the_latent_towards_its_nearest_codes():
    config = tiny("loss.lambda_g=0", "loss.lambda_fm=0", "loss.lambda_wave=0", "loss.lambda_mel=0",
                  "loss.lambda_commitment=1")
    stage = fresh_gan_stage(config)
    batch = synthetic_batch(config)
    features, classes = stage.conditioning(batch, "label")
    fake = stage.generator(features, classes).detach().requires_grad_(True)
    real = stage.real_latent(batch["audio"])
    terms = stage.generator_terms(fake, real, batch["audio"], None, classes)
    nearest = stage.codec.dequantize(stage.codec.quantize(fake.detach()))
    torch.testing.assert_close(terms["commitment"], (fake.detach() - nearest).abs().mean())
    terms["commitment"].backward()
    torch.testing.assert_close(fake.grad, torch.sign(fake.detach() - nearest) / fake.numel())


def test_audio_terms_and_commitment_share_one_code_search():
    config = tiny("loss.lambda_g=0", "loss.lambda_fm=0", "loss.lambda_commitment=1")
    stage = fresh_gan_stage(config)
    batch = synthetic_batch(config)
    features, classes = stage.conditioning(batch, "label")
    fake = stage.generator(features, classes).detach().requires_grad_(True)
    real = stage.real_latent(batch["audio"])
    searched = []
    original = stage.codec.quantize
    stage.codec.quantize = lambda latent: searched.append(latent.shape) or original(latent)
    terms = stage.generator_terms(fake, real, batch["audio"], None, classes)
    stage.codec.quantize = original
    assert searched == [fake.shape] and {"wave", "mel", "commitment"} <= set(terms)
    # The same values as each term computed on its own.
    expected = gan_stage_module.quantized_audio(stage.codec, fake.detach(), batch["audio"].shape[-1], True)
    torch.testing.assert_close(terms["wave"], F.l1_loss(expected, batch["audio"]))
    terms["wave"].backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_bf16_runs_decode_the_audio_terms_in_bf16_and_search_codes_in_fp32(as_if_bf16_kernels):
    stage = fresh_gan_stage(tiny("train.precision=bf16", "loss.lambda_g=0", "loss.lambda_fm=0"))
    batch = synthetic_batch(stage.config)
    features, classes = stage.conditioning(batch, "label")
    fake = stage.generator(features, classes).detach().requires_grad_(True)
    real = stage.real_latent(batch["audio"])
    seen = {}
    original = stage.codec.quantize

    def quantize(latent):
        seen["search"] = (latent.dtype, torch.is_autocast_enabled("cpu"))
        return original(latent)

    stage.codec.quantize = quantize
    decoder = stage.codec.vqvae.decoders[stage.codec.level]
    decoder.register_forward_hook(lambda module, args, out: seen.update(decoded=out.dtype))
    terms = stage.generator_terms(fake, real, batch["audio"], None, classes)
    assert seen == {"search": (torch.float32, False), "decoded": torch.bfloat16}
    assert terms["wave"].dtype == terms["mel"].dtype == torch.float32
    (terms["wave"] + terms["mel"]).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_bf16_training_encodes_the_real_latent_in_bf16_unless_a_latent_term_reads_it(as_if_bf16_kernels):
    stage = fresh_gan_stage(tiny("train.precision=bf16"))
    batch = synthetic_batch(stage.config)
    seen = []
    encoder = stage.codec.vqvae.encoders[stage.codec.level]
    encoder.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    assert stage.real_latent_at_run_precision()
    assert stage.real_latent(batch["audio"], at_run_precision=True).dtype == torch.float32
    assert stage.real_latent(batch["audio"]).dtype == torch.float32
    assert seen == [torch.bfloat16, torch.float32]
    stage.train_step([batch])
    assert seen[-1] == torch.bfloat16
    for term in ("loss.lambda_latent=1", "loss.lambda_quantized_latent=1"):
        assert not fresh_gan_stage(tiny("train.precision=bf16", term)).real_latent_at_run_precision()


def test_prepare_sets_the_standardisation_from_training_features_only_when_asked():
    config = tiny("generator.standardize_features=true")
    stage = fresh_gan_stage(config)
    batch = synthetic_batch(config)
    items = [{key: value[i] for key, value in batch.items()} for i in range(2)]
    stage.prepare(items, torch.utils.data.default_collate)
    torch.testing.assert_close(stage.generator.feature_mean, batch["features"].mean(0))
    plain = fresh_gan_stage(tiny())
    plain.prepare(items, torch.utils.data.default_collate)  # nothing to set: no error, no buffers
    assert "feature_mean" not in plain.generator.state_dict()


def test_class_source_selects_label_or_tcnn_prediction():
    batch = synthetic_batch(tiny())
    label_stage = fresh_gan_stage(tiny())
    assert label_stage.conditioning(batch, "label")[1].tolist() == [1, 4]
    assert label_stage.conditioning(batch, "tcnn")[1].tolist() == [3, 5]


def test_batches_without_cached_features_run_the_frontend():
    stage = fresh_gan_stage(tiny())
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    features, predicted = stage.image_features({"image": image})
    expected_features, expected_class = stage.frontend(image)
    assert features.shape == (1, 2048) and not features.is_inference()
    torch.testing.assert_close(features, expected_features, rtol=0, atol=0)
    assert predicted.tolist() == expected_class.tolist()


def test_non_finite_loss_is_reported_by_name():
    stage = fresh_gan_stage(tiny())
    stage.check_finite({"ok": torch.tensor(1.0)})
    with pytest.raises(NonFiniteLossError, match="'mel' is inf"):
        stage.check_finite({"ok": torch.tensor(1.0), "mel": torch.tensor(float("inf"))})


def test_gan_optimisers_follow_the_paper():
    config = tiny("optim.decay_every=3")
    stage = fresh_gan_stage(config)
    optimisers, schedulers = gan_optimisers(stage.generator, stage.discriminator, config.optim)
    group = optimisers["generator"].param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (1e-5, (0.5, 0.999), 1e-5, 1e-5)
    for _ in range(3):
        for name in ("generator", "discriminator"):
            optimisers[name].step()
            schedulers[name].step()
    assert optimisers["generator"].param_groups[0]["lr"] == pytest.approx(0.8e-5)
    assert optimisers["discriminator"].param_groups[0]["lr"] == pytest.approx(0.9e-5)


def test_tcnn_multi_stage_schedule():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = multi_stage(optimizer, [2, 4], 0.1)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])


def test_resumable_sampler_continues_the_same_epoch_order():
    sampler = ResumableSampler(10, CPU, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert {epoch for epoch, _ in full} == {2}
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(3)
    third = [index for _, index in sampler]
    assert third != [index for _, index in full] and sorted(third) == list(range(10))
    ranks = [ResumableSampler(10, DistInfo(r, r, 2, r == 0, torch.device("cpu"), "gloo"), seed=3) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(2)
    assert sorted(index for _, index in list(ranks[0]) + list(ranks[1])) == list(range(10))


def test_vqvae_stage_trains_on_random_hop_aligned_windows_of_each_clip():
    config = tiny("train.stage=vqvae", "train.vqvae_segment_seconds=0.25")
    stage = build_stage(config, CPU)
    clips = torch.randn(3, 1, config.clip_samples)
    torch.manual_seed(0)
    windows = stage.training_audio({"audio": clips})
    segment = round(0.25 * config.codec_rate)
    assert windows.shape == (3, 1, segment)
    hop = config.level_hop(0)
    for clip, window in zip(clips, windows):
        starts = [s for s in range(0, clip.shape[-1] - segment + 1, hop)
                  if torch.equal(clip[..., s:s + segment], window)]
        assert len(starts) == 1
    torch.manual_seed(0)
    assert torch.equal(stage.training_audio({"audio": clips}), windows)  # drawn from the torch RNG


@pytest.mark.parametrize("seconds", ["0", "10.0", "0.2501"])
def test_vqvae_segment_must_fit_the_clip_and_the_hop(seconds):
    with pytest.raises(ConfigError, match="vqvae_segment_seconds"):
        build_stage(tiny("train.stage=vqvae", f"train.vqvae_segment_seconds={seconds}"), CPU)


def test_gan_windows_cut_the_same_frames_of_latents_and_clips():
    config = tiny("train.gan_segment_seconds=0.25")
    stage = fresh_gan_stage(config)
    frames, per_frame = config.latent_length, config.clip_samples // config.latent_length
    # Frame t of the latent holds t; samples of frame t hold t too: aligned windows agree.
    latent = torch.arange(frames, dtype=torch.float32).expand(3, 4, frames)
    audio = torch.arange(frames, dtype=torch.float32).repeat_interleave(per_frame).expand(3, 1, -1)
    torch.manual_seed(1)
    starts = stage.draw_windows(3)
    windows = stage.window_latent(latent, starts)
    clips = stage.window_audio(audio, starts)
    assert windows.shape == (3, 4, stage.window_frames) and stage.window_frames == frames // 2
    assert clips.shape == (3, 1, stage.window_frames * per_frame)
    torch.testing.assert_close(clips[:, :, ::per_frame], windows[:, :1])
    losses = stage.train_step([synthetic_batch(config)])
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("seconds", ["0", "1.0", "0.2501"])
def test_gan_segment_must_be_whole_frames_within_the_clip(seconds):
    with pytest.raises(ConfigError, match="gan_segment_seconds"):
        fresh_gan_stage(tiny(f"train.gan_segment_seconds={seconds}"))
