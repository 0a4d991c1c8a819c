"""The config system: composition order, options extending options, checked keys, types and ranges."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ppfr.config import CONFIG_DIR, compose, groups, help_text, load_option
from ppfr.errors import ConfigError
from ppfr.fit import choose_threads, local_processes, main

ROOT = Path(__file__).resolve().parents[1]


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    """A small config tree: group `g` with a base option, a chain of deltas and a `_` base."""
    return write(
        tmp_path,
        {
            "config.yaml": "defaults: {g: top}\nexperiment: e\nn: 1\n",
            "experiment/e.yaml": "n: 2\n",
            "experiment/e2.yaml": "defaults: [e, {g: base}]\nn: 3\n",
            "g/base.yaml": "a: 1\nl: [1, 2]\nsub: {x: 1, y: 2}\nopen: {}\n",
            "g/mid.yaml": "defaults: [base]\na: 5\n",
            "g/top.yaml": "# a comment first is fine\ndefaults: [mid]\nsub: {y: 3}\nopen: {anything: 1}\n",
            "g/_shared.yaml": "s: 1\nsub: {x: 0}\n",
            "g/own.yaml": "defaults: [_shared]\nname: own\nsub: {x: 2, z: 9}\n",
        },
    )


def test_option_extends_a_chain_of_options(tree):
    top = OmegaConf.to_container(load_option("g", "top", tree))
    assert top == {"a": 5, "l": [1, 2], "sub": {"x": 1, "y": 3}, "open": {"anything": 1}}
    cfg = compose([], config_dir=tree)
    assert cfg.g.a == 5 and cfg.g.sub.y == 3 and "defaults" not in cfg.g
    assert compose(["g=mid"], config_dir=tree).g.sub.y == 2


def test_underscore_base_is_shared_not_an_option(tree):
    assert groups(tree)["g"] == ["base", "mid", "own", "top"]
    own = load_option("g", "own", tree)
    assert list(own) == ["name", "sub", "s"]  # its own keys first, then what it adds to the base
    assert OmegaConf.to_container(own.sub) == {"x": 2, "z": 9} and own.s == 1
    with pytest.raises(ConfigError, match="unknown option g=_shared; valid options: base, mid, own, top"):
        compose(["g=_shared"], config_dir=tree)


def test_delta_of_an_option_may_only_change_its_keys(tree):
    write(tree, {"g/typo.yaml": "defaults: [base]\nsub: {yy: 3}\n"})
    with pytest.raises(
        ConfigError, match=r"unknown config key 'sub\.yy' \(.*typo\.yaml extends base\).*x, y"
    ):
        load_option("g", "typo", tree)


def test_cycles_and_missing_bases_are_refused(tree):
    write(tree, {"g/p.yaml": "defaults: [q]\na: 1\n", "g/q.yaml": "defaults: [p]\na: 2\n"})
    with pytest.raises(ConfigError, match=r"cycle: p -> q -> p"):
        load_option("g", "p", tree)
    write(tree, {"g/orphan.yaml": "defaults: [nope]\n"})
    with pytest.raises(ConfigError, match=r"orphan\.yaml extends 'nope', which is not in g/ \(base, mid"):
        load_option("g", "orphan", tree)
    write(tree, {"g/choosy.yaml": "defaults: [{h: x}]\n"})
    with pytest.raises(ConfigError, match="group choices belong in configs/config.yaml or an experiment"):
        load_option("g", "choosy", tree)


def test_experiment_extends_an_experiment_and_chooses_options(tree):
    cfg = compose(["experiment=e2"], config_dir=tree)
    assert cfg.n == 3 and cfg.choices.g == "base" and cfg.g.a == 1
    assert compose(["experiment=e2", "g=top"], config_dir=tree).g.a == 5


def test_shipped_options_compose_and_deltas_keep_their_base():
    for group, options in groups().items():
        for option in options:
            assert "defaults" not in load_option(group, option), f"{group}/{option}"
    default = load_option("trainer", "default")
    for option, delta in {
        "cpu": {"accelerator": "cpu", "devices": 1},
        "ddp": {"devices": -1, "strategy": "ddp"},
    }.items():
        node = load_option("trainer", option)
        assert set(node) == set(default)
        assert {k: node[k] for k in delta} == delta
        assert node.precision == default.precision and node.max_epochs == default.max_epochs
    for option in groups()["data"]:  # shared keys come from data/_base.yaml
        data = load_option("data", option)
        assert data.name == option and data.batch_size == 32 and data.subset.pairs is None, option


def test_experiment_sets_task_and_cli_overrides_win():
    cfg = compose(["experiment=protect", "seed=7", "generate.batch_size=3", "logger=csv"])
    assert cfg.task == "protect"
    assert cfg.seed == 7
    assert cfg.generate.batch_size == 3
    assert cfg.logger.name == "csv"
    assert cfg.choices.logger == "csv"


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


def test_malformed_arguments():
    with pytest.raises(ConfigError, match="not of the form key=value"):
        compose(["seed"])
    with pytest.raises(ConfigError, match=r"recognizer=\[a,: cannot parse"):
        compose(["recognizer=[a,"])


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("protect.steps=abc", r"protect\.steps='abc' has type str; expected int"),
        ("protect.alpha=fast", r"protect\.alpha='fast' has type str; expected float"),
        ("protect.steps=2.5", r"protect\.steps=2\.5 has type float; expected int"),
        ("protect.steps=null", r"protect\.steps=null has type null; expected int"),
        ("protect.highpass.enabled=1", r"protect\.highpass\.enabled=1 has type int; expected bool"),
        ("eval.blackbox=dlib_resnet", r"eval\.blackbox='dlib_resnet' has type str; expected list"),
        ("generate.batch_size=0", r"generate\.batch_size=0: must be >= 1"),
        ("generate.shard_size=0", r"generate\.shard_size=0: must be >= 1"),
        ("eval.batch_size=0", r"eval\.batch_size=0: must be >= 1"),
        ("eval.grid=-1", r"eval\.grid=-1: must be >= 0"),
        ("threads=0", r"threads=0: must be >= 1"),
        ("seed=-1", r"seed=-1: must be >= 0 and <= 4294967295"),
        ("seed=abc", r"seed='abc': expected an integer"),
        ("data.subset.pairs=0", r"data\.subset\.pairs=0: must be >= 1"),
        (
            "eval.threshold_source=bogus",
            r"eval\.threshold_source: 'bogus' is not one of file, nearest, in_run, auto",
        ),
        ("data.root=${nope}", r"data\.root=\$\{nope\}: .*nope"),
    ],
)
def test_wrong_type_or_range_is_a_config_error_naming_key_and_value(arg, message):
    with pytest.raises(ConfigError, match=message):
        compose(["experiment=protect", arg])


def test_types_accepted_where_the_defaults_allow_them():
    cfg = compose(
        [
            "protect.alpha=2",  # an int where a float is expected
            "trainer.devices=2",  # `auto` in trainer/default, an int in trainer/cpu
            "recognizer.names=dlib_resnet",  # a list in recognizer/independent, a str in recognizer/all
            "data.pairs_file=null",  # null in data/celeba
            "data.subset.pairs=3",  # a null default takes anything
            "eval.grid=0",
            "trainer.precision=16",
        ]
    )
    assert cfg.trainer.precision == 16
    assert cfg.protect.alpha == 2 and cfg.trainer.devices == 2 and cfg.recognizer.names == "dlib_resnet"
    assert cfg.data.pairs_file is None and cfg.data.subset.pairs == 3 and cfg.eval.grid == 0


def test_recognizer_takes_a_name_or_a_list():
    cfg = compose(["recognizer=[mobilefacenet_tf,dlib_resnet]"])
    assert list(cfg.recognizer.names) == ["mobilefacenet_tf", "dlib_resnet"]
    assert compose(["recognizer=dlib_resnet"]).recognizer.names == "dlib_resnet"


def test_empty_mappings_take_user_keys():
    cfg = compose(["recognizer.weights.iresnet50=/w/backbone.pth"])
    assert cfg.recognizer.weights.iresnet50 == "/w/backbone.pth"


def test_help_lists_groups_and_options_but_not_bases():
    text = help_text()
    for group in ("data", "experiment", "logger", "protect", "recognizer", "trainer"):
        assert f"  {group}" in text
    assert "wandb" in text and "_base" not in text


def test_configs_are_the_package_data():
    assert (CONFIG_DIR / "config.yaml").is_file() and (CONFIG_DIR / "__init__.py").is_file()
    assert (CONFIG_DIR / "data" / "_base.yaml").is_file()


def test_print_config_prints_and_does_not_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    missing = tmp_path / "no-such-dataset"
    out = main(["experiment=data_check", f"data.root={missing}", f"run_dir={run_dir}", "print_config=true"])
    printed = OmegaConf.create(capsys.readouterr().out)
    assert out == {} and not run_dir.exists()
    assert printed.task == "data_check" and printed.data.root == str(missing) and printed.threads >= 1


def test_threads_follow_the_config_the_environment_or_the_cores(monkeypatch):
    cfg = compose(["threads=3"])
    assert choose_threads(cfg) == 3
    cfg = compose([])
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(cfg) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert choose_threads(compose(["trainer=cpu"])) == cores
    assert choose_threads(compose(["trainer=cpu", "trainer.devices=2"])) == max(1, cores // 2)
    assert local_processes(compose(["trainer.devices=[0,1,2]"]).trainer) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's count wins
    assert local_processes(compose(["trainer=cpu"]).trainer) == 4


def test_cli_errors_are_one_line_and_come_before_torch_is_imported():
    """`torch` made unimportable: a config error must still arrive, as one line, from the real CLI."""
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['fit', 'protect.steps=abc'];"
        "runpy.run_module('ppfr.fit', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["ConfigError: protect.steps='abc' has type str; expected int"]


@pytest.mark.slow
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
            "threads=1",
        ]
    )
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved == json.loads(json.dumps(results, default=str))
    assert saved["seed"] == 5 and saved["pairs"] == 4 and saved["images"] >= 4
    assert saved["machine"]["threads"] == 1 and saved["machine"]["flush_denormal"] is True
    config = OmegaConf.load(run_dir / "config.yaml")
    assert config.data.subset.pairs == 4 and config.threads == 1 and torch.get_num_threads() == 1
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B must write an offline run by default"


def test_unknown_wandb_mode_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(
        ConfigError, match=r"logger\.mode \(or \$WANDB_MODE\): 'offline2' is not one of offline"
    ):
        main(["experiment=data_check", "logger=wandb", "logger.mode=offline2", f"run_dir={tmp_path}"])


def test_unknown_task_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="task='nope'"):
        main(["task=nope", f"run_dir={tmp_path}", "logger=csv"])
