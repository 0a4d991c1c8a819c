"""The config system: composition order, checked keys, group options, the run directory."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ppfr.config import compose, help_text
from ppfr.errors import ConfigError
from ppfr.fit import main


def test_experiment_sets_task_and_cli_overrides_win():
    cfg = compose(["experiment=protect", "seed=7", "generate.batch_size=3", "logger=csv"])
    assert cfg.task == "protect"
    assert cfg.seed == 7
    assert cfg.generate.batch_size == 3
    assert cfg.logger.name == "csv"
    assert cfg.choices.logger == "csv"


def test_group_option_replaces_the_whole_node():
    cfg = compose(["trainer=cpu"])
    assert cfg.trainer.accelerator == "cpu"
    assert OmegaConf.select(cfg, "trainer.devices") == 1


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"generate\.batchsize.*valid keys here: .*batch_size"):
        compose(["generate.batchsize=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'nonsense'.*valid top-level"):
        compose(["nonsense=1"])


def test_unknown_option_lists_the_options():
    with pytest.raises(ConfigError, match=r"unknown option logger=tensorboard; valid options: csv, wandb"):
        compose(["logger=tensorboard"])
    with pytest.raises(ConfigError, match=r"unknown option experiment=nope"):
        compose(["experiment=nope"])


def test_malformed_argument():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        compose(["seed"])


def test_recognizer_takes_a_name_or_a_list():
    cfg = compose(["recognizer=[mobilefacenet_tf,dlib_resnet]"])
    assert list(cfg.recognizer.names) == ["mobilefacenet_tf", "dlib_resnet"]
    assert compose(["recognizer=dlib_resnet"]).recognizer.names == "dlib_resnet"


def test_empty_mappings_take_user_keys():
    cfg = compose(["recognizer.weights.iresnet50=/w/backbone.pth"])
    assert cfg.recognizer.weights.iresnet50 == "/w/backbone.pth"


def test_help_lists_groups_and_options():
    text = help_text()
    for group in ("data", "experiment", "logger", "protect", "recognizer", "trainer"):
        assert f"  {group}" in text
    assert "wandb" in text


def test_run_dir_holds_config_and_results(tmp_path, capsys):
    """A real run of the CLI (the data_check task) writes config.yaml and results.json."""
    pytest.importorskip("datamodules")


def test_unknown_task_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="task='nope'"):
        main(["task=nope", f"run_dir={tmp_path}", "logger=csv"])
