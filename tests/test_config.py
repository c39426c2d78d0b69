from pathlib import Path

import pytest

from conchshell.config import Config, config_from_dict, config_to_dict, load_config
from conchshell.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_reproduce_the_paper_deep_model():
    config = Config()
    assert config.codec.level == 0
    assert config.hop_length == 8
    assert config.latent_length == 16_000
    assert config.clip_samples == 128_000
    assert (config.loss.lambda_g, config.loss.lambda_fm, config.loss.lambda_wave, config.loss.lambda_mel) == (
        0.5,
        3.0,
        40.0,
        15.0,
    )


@pytest.mark.parametrize("level, hop, length", [(0, 8, 16_000), (1, 32, 4_000), (2, 128, 1_000)])
def test_latent_length_follows_level_and_duration(level, hop, length):
    config = Config()
    config.codec.level = level
    assert (config.hop_length, config.latent_length) == (hop, length)
    config.data.clip_seconds = 4.0
    assert config.latent_length == length // 2


def test_resampling_codec_uses_its_own_rate_for_latent_length():
    config = Config()
    config.codec.resample = True
    config.codec.sample_rate = 44_100
    assert config.latent_length == 44_100


def test_unaligned_duration_is_an_error():
    config = Config()
    config.codec.level = 2
    config.data.clip_seconds = 0.01
    with pytest.raises(ConfigError, match="multiple of the level-2 hop 128"):
        config.latent_length


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "parent.yaml", "name: parent\ntrain:\n  batch_size: 8\n  max_steps: 10\n")
    child = write(tmp_path / "child.yaml", "base: parent.yaml\nname: child\ntrain:\n  max_steps: 20\n")
    config = load_config(child, ["train.seed=7", "loss.lambda_g=1", "image.tcnn_checkpoint=null"])
    assert config.name == "child"
    assert config.train.batch_size == 8
    assert config.train.max_steps == 20
    assert config.train.seed == 7
    assert config.loss.lambda_g == 1.0 and isinstance(config.loss.lambda_g, float)
    assert config.image.tcnn_checkpoint is None


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.batchsize'"):
        load_config(path)


def test_unknown_override_is_named(tmp_path):
    path = write(tmp_path / "ok.yaml", "name: x\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.lr'"):
        load_config(path, ["optim.lr=3"])


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  batch_size: two\n")
    with pytest.raises(ConfigError, match="'train.batch_size' must be int"):
        load_config(path)
    path = write(tmp_path / "bad2.yaml", "optim:\n  betas: 0.5\n")
    with pytest.raises(ConfigError, match="'optim.betas' must be a list"):
        load_config(path)
    path = write(tmp_path / "bad3.yaml", "train:\n  batch_size: true\n")
    with pytest.raises(ConfigError, match="'train.batch_size' must be int"):
        load_config(path)


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; people write learning rates that way.
    path = write(tmp_path / "lr.yaml", "optim:\n  lr_g: 1e-4\n")
    config = load_config(path, ["optim.lr_d=3E-5", "loss.lambda_mel=-2e1"])
    assert (config.optim.lr_g, config.optim.lr_d, config.loss.lambda_mel) == (1e-4, 3e-5, -20.0)
    with pytest.raises(ConfigError, match="'train.batch_size' must be int"):
        load_config(path, ["train.batch_size=1e3"])
    with pytest.raises(ConfigError, match="'optim.lr_g' must be float"):
        load_config(path, ["optim.lr_g=1e-4x"])


def test_malformed_yaml_and_missing_file(tmp_path):
    path = write(tmp_path / "broken.yaml", "train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: malformed YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="malformed override"):
        load_config(write(tmp_path / "ok.yaml", "{}"), ["train.batch_size"])


def test_round_trip_through_plain_dict():
    config = Config()
    config.train.batch_size = 5
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.latent_length > 0


def test_config_loss_defaults_are_the_library_paper_weights():
    from conchshell.nn.losses import LossWeights
    from conchshell.training.stages.gan import loss_weights

    assert loss_weights(Config()) == LossWeights()
    original = load_config(Path(__file__).parents[1] / "configs" / "original_code.yaml")
    assert loss_weights(original) == LossWeights.original_code()
