from dataclasses import asdict

import pytest
from omegaconf import OmegaConf
from support.runs import ROOT

from pipeline.config import Config, ConfigError, flatten, from_yaml, load_config, to_yaml


def test_defaults_are_the_papers_setting():
    cfg = load_config()
    assert cfg.model.generator == "resnet_9blocks" and cfg.model.discriminator == "basic"
    assert (cfg.model.ngf, cfg.model.ndf, cfg.model.norm) == (64, 64, "instance")
    assert (cfg.loss.gan_mode, cfg.loss.lambda_a, cfg.loss.lambda_b, cfg.loss.lambda_idt) == ("lsgan", 10, 10, 0.5)
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2) == (2e-4, 0.5, 0.999)
    assert (cfg.data.load_size, cfg.data.crop_size, cfg.data.batch_per_rank) == (286, 256, 1)
    assert cfg.train.pool_size == 50 and cfg.optim.decay_start_frac == 0.5


def test_default_yaml_restates_the_schema_defaults():
    from_file = load_config([ROOT / "configs" / "default.yaml"])
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    assert OmegaConf.to_container(from_file) == defaults


@pytest.mark.parametrize("name", ["default", "quickstart", "horse2zebra", "monet2photo", "summer2winter_yosemite",
                                  "cityscapes", "colour", "colourise", "scanner"])
def test_shipped_configs_load(name):
    load_config([ROOT / "configs" / f"{name}.yaml"])


def test_yaml_then_command_line_precedence(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  steps: 10\n  seed: 3\n")
    cfg = load_config([path], ["train.steps=20"])
    assert cfg.train.steps == 20 and cfg.train.seed == 3


def test_unknown_key_in_yaml_names_file_and_closest_key(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("loss:\n  lamda_a: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'loss.lamda_a' in config file .*typo.yaml.*"
                                          r"did you mean 'loss.lambda_a'"):
        load_config([path])


def test_unknown_key_on_command_line():
    with pytest.raises(ConfigError, match=r"'train.step'.*the command line.*did you mean 'train.steps'"):
        load_config([], ["train.step=5"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"bad value for 'train.steps'.*'many'"):
        load_config([], ["train.steps=many"])


def test_bad_choice_lists_choices_and_closest():
    with pytest.raises(ConfigError, match=r"'loss.gan_mode' is 'lsgam'; did you mean 'lsgan'\?.*vanilla"):
        load_config([], ["loss.gan_mode=lsgam"])


def test_compile_mode_is_one_of_torch_compiles_modes():
    assert load_config([], ["perf.compile_mode=reduce-overhead"]).perf.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match=r"'perf.compile_mode' is 'reduce_overhead'; did you mean 'reduce-overhead'"):
        load_config([], ["perf.compile_mode=reduce_overhead"])


def test_padding_and_norm_choices_and_groups_are_checked():
    with pytest.raises(ConfigError, match=r"'model.padding' is 'reflection'; did you mean 'reflect'\?"):
        load_config([], ["model.padding=reflection"])
    with pytest.raises(ConfigError, match="'model.norm_groups' must be positive"):
        load_config([], ["model.norm=group", "model.norm_groups=0"])
    assert load_config([], ["model.norm=layer"]).model.norm == "layer"


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["nope.yaml"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config([], ["train.steps"])


def test_crop_larger_than_load_is_refused():
    with pytest.raises(ConfigError, match="load_size"):
        load_config([], ["data.load_size=100", "data.crop_size=128"])


def test_config_is_read_only_and_round_trips():
    cfg = load_config([], ["train.steps=7"])
    from omegaconf.errors import ReadonlyConfigError

    with pytest.raises(ReadonlyConfigError):
        cfg.train.steps = 8
    again = from_yaml(to_yaml(cfg))
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    flat = flatten(cfg)
    assert flat["train.steps"] == 7 and flat["loss.gan_mode"] == "lsgan"
    assert len(flat) == len([k for k in flat if "." in k or k == "run_dir"])
    assert set(asdict(Config()).keys()) == {k.split(".")[0] for k in flat}


@pytest.mark.parametrize("key, value, wants", [
    ("checkpoint.every_steps", -1, ">= 0"), ("control.max_nonfinite_steps", -2, ">= 0"), ("perf.threads", -1, ">= 0"),
    ("checkpoint.keep_last", 0, "at least 1"), ("eval.batch_size", 0, "at least 1"),
    ("checkpoint.min_free_mb", -5, ">= 0"),
])
def test_counts_out_of_range_name_their_key(key, value, wants):
    with pytest.raises(ConfigError, match=f"'{key}' must be {wants}"):
        load_config(overrides=[f"{key}={value}"])


def test_keys_moved_out_of_train_still_work_with_a_warning_naming_the_new_key(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  steps: 7\n  log_every_steps: 3\n  fused_calls: false\n")
    with caplog.at_level("WARNING", logger="pipeline.config"):
        cfg = load_config([old], ["train.max_nonfinite_steps=4"])
    assert (cfg.train.steps, cfg.report.log_every_steps, cfg.perf.fused_calls) == (7, 3, False)
    assert cfg.control.max_nonfinite_steps == 4
    said = caplog.text
    assert "'train.log_every_steps' in config file" in said and "is now 'report.log_every_steps'" in said
    assert "'train.fused_calls'" in said and "'perf.fused_calls'" in said
    assert "'train.max_nonfinite_steps' in the command line is now 'control.max_nonfinite_steps'" in said
    # A checkpoint's config saved before the split still loads.
    assert from_yaml("train:\n  threads: 2\n").perf.threads == 2


def test_an_old_and_a_new_name_of_one_key_together_are_an_error():
    with pytest.raises(ConfigError, match=r"sets both 'train.threads' and 'perf.threads'.*keep only 'perf.threads'"):
        load_config([], ["train.threads=1", "perf.threads=2"])


def test_a_saved_config_with_old_keys_loads_silently_and_a_bad_new_group_is_a_config_error(tmp_path, caplog):
    # An old checkpoint's config: renamed without a warning its reader could not act on.
    with caplog.at_level("WARNING", logger="pipeline.config"):
        assert from_yaml("train:\n  log_every_steps: 9\n").report.log_every_steps == 9
    assert "is now" not in caplog.text
    # An old key beside a new group whose keys are all commented out: merged into it.
    empty = tmp_path / "empty_group.yaml"
    empty.write_text("report:\ntrain:\n  log_every_steps: 5\n")
    assert load_config([empty]).report.log_every_steps == 5
    scalar = tmp_path / "scalar_group.yaml"
    scalar.write_text("report: 3\ntrain:\n  log_every_steps: 5\n")
    with pytest.raises(ConfigError, match="'report' in config file .* is a group of settings, not a value"):
        load_config([scalar])
