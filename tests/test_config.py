"""The config system: composition order, checked keys, group options, the run directory."""

from __future__ import annotations

import json

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


def test_cli_run_writes_config_results_and_offline_wandb(faces_mini, align_cache, tmp_path, monkeypatch):
    """The main job through the real CLI: run dir, resolved config, results, and an offline W&B run."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    results = main(
        [
            "experiment=data_check",
            "data=lfw",
            f"data.root={faces_mini / 'lfw'}",
            "data.subset.pairs=4",
            f"data.cache_dir={align_cache}",
            f"run_dir={run_dir}",
            "seed=5",
        ]
    )
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results, default=str))
    assert saved["seed"] == 5 and saved["pairs"] == 4 and saved["images"] >= 4
    assert OmegaConf.load(run_dir / "config.yaml").data.subset.pairs == 4
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B must write an offline run by default"


def test_unknown_task_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="task='nope'"):
        main(["task=nope", f"run_dir={tmp_path}", "logger=csv"])
