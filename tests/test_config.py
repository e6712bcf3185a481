"""Config loading: typed, unknown keys rejected with the key named, overrides, round trip."""

import pytest

from calm_core.config import Config, config_from_yaml, load_config
from calm_core.errors import ConfigError


def test_builtin_configs_load():
    for name in ("debug", "demo", "small", "paper"):
        cfg = load_config(name)
        assert isinstance(cfg, Config)
    assert load_config("paper").ae.d_model == 512 and load_config("paper").ae.latent_dim == 128


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("ae:\n  latnet_dim: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "ae.latnet_dim" in str(e.value) and str(p) in str(e.value) and "latent_dim" in str(e.value)


def test_unknown_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage_1:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'stage_1'.*stage1"):
        load_config(p)


def test_wrong_type_names_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage1:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match="stage1.batch_size.*integer"):
        load_config(p)
    p.write_text("distributed:\n  use_gpu: 1\n")
    with pytest.raises(ConfigError, match="distributed.use_gpu"):
        load_config(p)


def test_overrides():
    cfg = load_config("debug", ["ae.K=8", "stage1.lr=1e-3", "distributed.use_gpu=true", "data.eot_marker=<|end|>"])
    assert cfg.ae.K == 8 and cfg.stage1.lr == 1e-3 and cfg.distributed.use_gpu is True
    assert cfg.data.eot_marker == "<|end|>"
    assert cfg.ae.latent_dim == load_config("debug").ae.latent_dim  # the rest stays


def test_override_errors():
    with pytest.raises(ConfigError, match="ae.latnt_dim"):
        load_config("debug", ["ae.latnt_dim=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("debug", ["ae.K"])
    with pytest.raises(ConfigError, match="ae.K.*integer"):
        load_config("debug", ["ae.K=four"])


def test_value_checks():
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config("debug", ["distributed.zero_stage=4"])
    with pytest.raises(ConfigError, match="precision"):
        load_config("debug", ["distributed.precision=fp8"])
    with pytest.raises(ConfigError, match="ae.mask_prob"):
        load_config("debug", ["ae.mask_prob=1.5"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="neither a file nor a built-in"):
        load_config("no_such_config")


def test_round_trip_yaml():
    cfg = load_config("small", ["ae.beta=0.01"])
    again = config_from_yaml(cfg.to_yaml())
    assert again == cfg and again.section_hash() == cfg.section_hash()
    assert again.section_hash("ae") != load_config("small").section_hash("ae")


@pytest.mark.parametrize("key", ["latents.actor_memory_mb", "eval.actor_memory_mb"])
def test_a_negative_actor_memory_is_refused_by_name(key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("debug", [f"{key}=-1"])
    assert getattr(getattr(load_config("debug", [f"{key}=0"]), key.split(".")[0]), "actor_memory_mb") == 0


@pytest.mark.parametrize("override,key", [("stage2.lr=0", "stage2.lr"), ("baseline.max_minutes=-1", "baseline.max_minutes"),
                                          ("stage1.brier_samples=1", "stage1.brier_samples")])
def test_every_training_section_checks_its_loop_settings(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("debug", [override])
