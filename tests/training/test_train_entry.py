"""train.py end to end, as a user runs it: real subprocesses on the tiny config and corpus.

Every run here is a few steps of configs/tiny.yaml (narrow networks, 0.5 s clips). GAN
runs read the session's feature cache (tests/training/conftest.py) except one, which
covers the on-the-fly frontend.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conchshell.config import load_config
from conchshell.export import load_generator_export
from conchshell.models.factory import build_codec, build_tcnn_from_config
from conchshell.training.checkpointing import CheckpointManager
from conchshell.training.trainer import make_datasets

from .conftest import PYTHON, REPO, subprocess_env

SMALL_RUN = ["train.max_val_items=2", "train.num_eval_samples=1", "train.log_every=1"]


def train_command(out: Path, *overrides: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [PYTHON, "train.py", "--config", "configs/tiny.yaml", "--out", str(out), *extra, *SMALL_RUN, *overrides]


def run_train(out: Path, *overrides: str, extra: tuple[str, ...] = (), timeout: int = 300
              ) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(out, *overrides, extra=extra), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def data_overrides(corpus, cached: bool = True) -> list[str]:
    items = [f"data.manifest={corpus.manifest}"]
    if cached:
        items.append(f"data.feature_cache={corpus.feature_cache}")
    return items


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"train.py failed ({result.returncode}):\n{result.stderr[-4000:]}"


def model_states(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    return CheckpointManager.load(path)["models"]


def assert_same_models(a: Path, b: Path) -> None:
    left, right = model_states(a), model_states(b)
    assert left.keys() == right.keys()
    for name in left:
        assert left[name].keys() == right[name].keys()
        for key in left[name]:
            torch.testing.assert_close(right[name][key], left[name][key], rtol=0, atol=1e-6,
                                       msg=f"{name}.{key} differs")


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("override, needle", [
    ("train.bogus_key=1", "unknown config key 'train.bogus_key'"),
    ("train.max_steps=many", "train.max_steps"),
])
def test_config_errors_exit_2_with_one_line(tmp_path, override, needle):
    result = run_train(tmp_path / "run", override, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint_is_a_one_line_error(tmp_path, tiny_corpus):
    result = run_train(tmp_path / "run", *data_overrides(tiny_corpus), extra=("--resume",), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --resume: no checkpoint")
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- GAN


@pytest.fixture(scope="module")
def gan_reference(tiny_corpus, tmp_path_factory) -> Path:
    """An uninterrupted 4-step GAN run (6 training items, batch 2: crosses an epoch)."""
    out = tmp_path_factory.mktemp("gan_reference")
    assert_ok(run_train(out, *data_overrides(tiny_corpus)))
    return out


def test_gan_run_writes_checkpoints_exports_and_logs(gan_reference):
    out = gan_reference
    manager = CheckpointManager(out, keep_last=3)
    assert [step for step, _ in manager.checkpoints()] == [2, 4]
    state = manager.load(manager.latest())
    assert (state["stage"], state["step"], state["epoch"], state["position"]) == ("gan", 4, 1, 1)
    assert set(state["optimizers"]) == set(state["schedulers"]) == {"generator", "discriminator"}
    assert len(state["rng"]) == 1 and state["config"]["train"]["stage"] == "gan"
    assert isinstance(state["git_commit"], str)
    assert (out / "ckpt-best.pt").is_file() and (out / "best.json").is_file()

    generator, config, meta = load_generator_export(out / "G-step=4.pt")
    assert meta["step"] == 4 and config.name == "tiny"
    for key, value in generator.state_dict().items():
        torch.testing.assert_close(value, state["models"]["generator"][key], rtol=0, atol=0)
    assert (out / "G-best.pt").is_file()
    assert load_config(out / "config.yaml").train.max_val_items == 2

    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert any('"g/mel"' in line and '"step": 1' in line for line in lines)
    assert any('"val/mel_l1"' in line for line in lines)
    assert any(p.name.startswith("events.") for p in (out / "tensorboard").iterdir())


def test_sigkill_then_resume_matches_the_uninterrupted_run(gan_reference, tiny_corpus, tmp_path):
    out = tmp_path / "killed"
    process = subprocess.Popen(train_command(out, *data_overrides(tiny_corpus)), cwd=REPO,
                               env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "ckpt-step=00000002.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.exists(), process.stderr.read().decode()[-3000:] if process.poll() is not None else "timeout"
    os.kill(process.pid, signal.SIGKILL)  # mid-export or mid-step 3: either way no half files
    process.wait()
    process.stderr.close()

    resumed = run_train(out, *data_overrides(tiny_corpus))
    assert_ok(resumed)
    assert "resuming from" in resumed.stderr
    assert not list(out.glob(".tmp-*"))
    assert_same_models(gan_reference / "ckpt-step=00000004.pt", out / "ckpt-step=00000004.pt")


def test_nan_loss_stops_naming_step_and_term_and_keeps_last_checkpoint(gan_reference, tiny_corpus, tmp_path):
    out = tmp_path / "diverged"
    start = gan_reference / "ckpt-step=00000002.pt"
    # A NaN weight is the simplest way to poison exactly one term from step 3 on.
    result = run_train(out, *data_overrides(tiny_corpus), "loss.lambda_wave=.nan", extra=("--resume", str(start)))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'wave'" in last and "step 3" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not list(out.glob("ckpt-step=*")) and not list(out.glob("G-step=*"))
    assert CheckpointManager.load(start)["step"] == 2  # the good checkpoint is untouched


def test_init_from_starts_a_new_run_from_the_weights_only(gan_reference, tiny_corpus, tmp_path):
    out = tmp_path / "finetune"
    source = gan_reference / "ckpt-step=00000004.pt"
    # Learning rates ~0: after its one step the new run must still hold the source weights.
    result = run_train(out, *data_overrides(tiny_corpus), f"train.init_from={source}", "train.max_steps=1",
                       "loss.lambda_wave=0", "optim.lr_g=1e-12", "optim.lr_d=1e-12")
    assert_ok(result)
    assert f"starting from the weights of {source}" in result.stderr
    state = CheckpointManager.load(out / "ckpt-step=00000001.pt")
    assert state["step"] == 1 and state["config"]["train"]["init_from"] == str(source)
    adam_steps = {float(s["step"]) for s in state["optimizers"]["generator"]["state"].values()}
    assert adam_steps == {1.0}  # fresh optimiser moments, not the source's 4 steps
    assert_same_models(source, out / "ckpt-step=00000001.pt")

    # The run's own checkpoint wins over init_from from then on.
    again = run_train(out, *data_overrides(tiny_corpus), f"train.init_from={source}", "train.max_steps=2",
                      "loss.lambda_wave=0", "optim.lr_g=1e-12", "optim.lr_d=1e-12")
    assert_ok(again)
    assert "resuming from" in again.stderr and CheckpointManager.load(out / "ckpt-step=00000002.pt")["step"] == 2


def test_init_from_keeps_layers_the_checkpoint_lacks_at_their_initialisation(gan_reference, tiny_corpus, tmp_path):
    out = tmp_path / "conditional"
    source = gan_reference / "ckpt-step=00000004.pt"
    result = run_train(out, *data_overrides(tiny_corpus), f"train.init_from={source}", "train.max_steps=1",
                       "discriminator.class_conditional=true")
    assert_ok(result)
    assert "tensors it lacks keep their initialisation: discriminator." in result.stderr
    assert "class_projection" in result.stderr
    assert "class_projection" in "".join(model_states(out / "ckpt-step=00000001.pt")["discriminator"])


def test_init_from_a_missing_checkpoint_is_a_one_line_error(tiny_corpus, tmp_path):
    result = run_train(tmp_path / "run", *data_overrides(tiny_corpus), f"train.init_from={tmp_path}/nope.pt",
                       timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: train.init_from: checkpoint not found: {tmp_path}/nope.pt"
    assert "Traceback" not in result.stderr


def test_fresh_run_standardises_features_with_the_training_set_statistics(tiny_corpus, tmp_path):
    out = tmp_path / "standardised"
    assert_ok(run_train(out, *data_overrides(tiny_corpus), "generator.standardize_features=true",
                        "train.max_steps=1", "train.max_val_items=1"))
    generator, _, _ = load_generator_export(out / "G-step=1.pt")
    config = load_config(REPO / "configs/tiny.yaml", data_overrides(tiny_corpus))
    train_set, _, _ = make_datasets(config)
    features = torch.stack([train_set[i]["features"].float() for i in range(len(train_set))]).double()
    torch.testing.assert_close(generator.feature_mean, features.mean(0).float())
    assert not torch.equal(generator.feature_std, torch.ones_like(generator.feature_std))


@pytest.mark.heavy
def test_gan_without_feature_cache_runs_the_frontend(tiny_corpus, tmp_path):
    # ~30 s on 2 busy cores (the full-size seeded I3D per image); the same path is covered
    # in process by test_stages.py::test_batches_without_cached_features_run_the_frontend.
    out = tmp_path / "uncached"
    assert_ok(run_train(out, *data_overrides(tiny_corpus, cached=False), "train.max_steps=1",
                        "train.max_val_items=1"))
    assert (out / "ckpt-step=00000001.pt").is_file() and (out / "G-step=1.pt").is_file()


def test_torchrun_two_processes_gloo(tiny_corpus, tmp_path):
    out = tmp_path / "ddp"
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--config", "configs/tiny.yaml", "--out", str(out), *SMALL_RUN, *data_overrides(tiny_corpus),
               "train.max_steps=2", "train.device=cpu"]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert_ok(result)
    state = CheckpointManager.load(out / "ckpt-step=00000002.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # Ranks draw different random numbers (seed + rank) and each saved its own state.
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert (out / "G-step=2.pt").is_file()


# ----------------------------------------------------------------------------- TCNN and VQ-VAE


def test_tcnn_stage_trains_and_exports_loadable_weights(tiny_corpus, tmp_path):
    out = tmp_path / "tcnn"
    assert_ok(run_train(out, f"data.manifest={tiny_corpus.manifest}", "train.stage=tcnn", "train.max_steps=3",
                        "train.ckpt_every=3"))
    state = CheckpointManager.load(out / "ckpt-step=00000003.pt")
    assert state["stage"] == "tcnn" and state["schedulers"]["tcnn"]["last_epoch"] == 3
    config = load_config(REPO / "configs/tiny.yaml", [f"image.tcnn_checkpoint={out / 'TCNN-step=3.pt'}"])
    tcnn = build_tcnn_from_config(config)
    for key, value in tcnn.state_dict().items():
        torch.testing.assert_close(value, state["models"]["tcnn"][key], rtol=0, atol=0)
    assert (out / "TCNN-best.pt").is_file()
    assert '"val/cross_entropy"' in (out / "metrics.jsonl").read_text()


def test_vqvae_stage_resumes_and_exports_a_codec(tiny_corpus, tmp_path):
    common = [f"data.manifest={tiny_corpus.manifest}", "train.stage=vqvae", "train.ckpt_every=2"]
    out = tmp_path / "vqvae"
    assert_ok(run_train(out, *common, "train.max_steps=2"))
    resumed = run_train(out, *common, "train.max_steps=3")
    assert_ok(resumed)
    assert "resuming from" in resumed.stderr
    state = CheckpointManager.load(out / "ckpt-step=00000003.pt")
    stats = state["extra"]["codebook_statistics"]
    assert bool(stats["0.initialised"]) and stats["0.k_elem"].sum() > 0
    assert '"val/reconstruction"' in (out / "metrics.jsonl").read_text()

    config = load_config(REPO / "configs/tiny.yaml", [f"codec.checkpoint={out / 'codec-step=3.pt'}"])
    codec = build_codec(config)
    torch.testing.assert_close(codec.vqvae.state_dict()["bottleneck.level_blocks.0.k"],
                               state["models"]["vqvae"]["bottleneck.level_blocks.0.k"], rtol=0, atol=0)


@pytest.mark.heavy
def test_vqvae_resume_matches_the_uninterrupted_run(tiny_corpus, tmp_path):
    """The EMA codebook statistics live outside the state dict: resume must restore them."""
    common = [f"data.manifest={tiny_corpus.manifest}", "train.stage=vqvae", "train.ckpt_every=2",
              "train.vqvae_segment_seconds=0.25"]  # random windows must repeat after a resume too
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert_ok(run_train(straight, *common, "train.max_steps=3"))
    assert_ok(run_train(split, *common, "train.max_steps=2"))
    assert_ok(run_train(split, *common, "train.max_steps=3"))
    assert_same_models(straight / "ckpt-step=00000003.pt", split / "ckpt-step=00000003.pt")


@pytest.mark.cuda
def test_torchrun_one_process_on_cuda_in_bf16(tiny_corpus, tmp_path):
    out = tmp_path / "cuda"
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               "--config", "configs/tiny.yaml", "--out", str(out), *SMALL_RUN, *data_overrides(tiny_corpus),
               "train.max_steps=2", "train.device=cuda", "train.precision=bf16"]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert_ok(result)
    assert "on cuda:0" in result.stderr
    state = CheckpointManager.load(out / "ckpt-step=00000002.pt")
    assert state["step"] == 2 and (out / "G-step=2.pt").is_file()
