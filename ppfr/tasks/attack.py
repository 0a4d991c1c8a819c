"""experiment=attack: train a reconstruction attacker against `protect=<method>` and measure the leak;
experiment=attack_all: the same for every protection option of `attack.methods`, each in its own sub-run.

    python -m ppfr.fit experiment=attack protect=lfsa
    python -m ppfr.fit experiment=attack protect=blur attack.identity_loss.weight=0.5   # stronger attacker
    python -m ppfr.fit experiment=attack_all protect.steps=50   # protect.* overrides go to every method having the key
"""

from __future__ import annotations

import copy
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

import datamodules
from attacks import ATTACKERS
from attacks.evaluate import evaluate
from attacks.pairs import protect_images, set_dir, training_pairs
from attacks.train import fit
from ppfr import protect, recognizers
from ppfr.config import load_option, to_dict
from ppfr.errors import ConfigError
from ppfr.generate import build_method
from ppfr.run import Run, format_table


def surrogate(cfg: DictConfig, blackbox: list[recognizers.Recognizer]) -> recognizers.Recognizer | None:
    """The identity-loss recognizer: one the defender published (first of protect.ensemble by default),
    never a black box of eval.blackbox nor a sibling of one."""
    node = cfg.attack.identity_loss
    if not node.weight:
        return None
    name = node.recognizer or next(iter(cfg.protect.get("ensemble") or []), None)
    if not name:
        raise ConfigError(
            f"attack.identity_loss.recognizer: protect={cfg.protect.name} has no ensemble to take the "
            "surrogate from; name one (not a black box of eval.blackbox)"
        )
    if name in cfg.eval.blackbox:
        raise ConfigError(
            f"attack.identity_loss.recognizer={name} is a black box of eval.blackbox: the attacker must not "
            "train through the recognizer that judges re-identification"
        )
    (rec,) = recognizers.from_config([name], cfg.recognizer)
    try:
        recognizers.check_disjoint([rec], blackbox)
    except ConfigError as err:
        raise ConfigError(f"attack.identity_loss.recognizer={name}: {err}") from err
    return rec


def attack(
    cfg: DictConfig,
    run: Run,
    method: protect.ProtectionMethod,
    method_record: dict[str, Any],
    models: dict[str, str | None],
    blackbox: list[recognizers.Recognizer],
) -> dict[str, Any]:
    """Pairs, training and evaluation of one attacker against `method`; the results (also in run).

    Every image is protected first, on every process (generation may run on several devices);
    then the attacker trains, and rank 0 evaluates it."""
    acfg = cfg.attack
    if acfg.identity_loss.weight and acfg.augment.crop:
        raise ConfigError("attack.identity_loss needs whole aligned faces: set attack.augment.crop=null")
    if not 0 <= acfg.val_fraction < 1:
        raise ConfigError(f"attack.val_fraction={acfg.val_fraction}: a share in [0, 1)")
    f = surrogate(cfg, blackbox)
    test_dm = datamodules.create(to_dict(cfg.data))
    train_dm = datamodules.create(to_dict(acfg.train_data))
    datamodules.check_disjoint_identities(
        train_dm, test_dm, "attack.train_data", "an attacker must be trained on other people"
    )
    test_dir = set_dir(acfg.test_set_dir, cfg, method_record, cfg.data, "attack_test")
    # the test set first: it is the fixed cost, and pairs.count can then grow over later runs
    test_records = protect_images(
        cfg, run, method, method_record, models, test_dm, cfg.data, range(len(test_dm.dataset)), test_dir
    )
    data, pairs_report = training_pairs(cfg, run, method, method_record, models, train_dm)
    run.add_results(method=method_record, pairs=pairs_report, test_set_dir=str(test_dir))
    module = ATTACKERS.create(
        acfg.name,
        to_dict(acfg),
        in_channels=method.attacker_channels,
        surrogate=f,
        method=method,
        seed=cfg.seed,
    )
    training = fit(cfg, run, module, data)
    rank = training.pop("global_rank")
    run.add_results(training=training)
    if rank:  # the other DDP processes are done: rank 0 evaluates
        return {}
    results = {"attack": evaluate(cfg, run, module, method, test_dm, test_records, blackbox)}
    run.add_results(**results)
    return {"training": training, **results}


def run_one(cfg: DictConfig, run: Run) -> dict[str, Any]:
    method, method_record, models, blackbox = build_method(cfg)
    return attack(cfg, run, method, method_record, models, blackbox)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def method_config(cfg: DictConfig, option: str) -> tuple[DictConfig, list[str]]:
    """`configs/protect/<option>.yaml` with the protect.* keys this run changed from its own option
    (command line, experiment) applied where the option has them; the keys it does not have."""
    chosen = cfg.choices.get("protect", "lfsa")
    changed = {
        k: v
        for k, v in _flat(to_dict(cfg.protect)).items()
        if _flat(to_dict(load_option("protect", chosen))).get(k, ...) != v
    }
    node = load_option("protect", option)
    have = _flat(to_dict(node))
    for key, value in changed.items():
        if key in have:
            OmegaConf.update(node, key, value, merge=False)
    return node, sorted(k for k in changed if k not in have)


def run_all(cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Every option of `attack.methods`, each its own run under `<run_dir>/<option>`, and a summary table."""
    summary: dict[str, Any] = {}
    for option in cfg.attack.methods:
        sub = copy.deepcopy(cfg)
        node, skipped = method_config(cfg, option)
        sub.protect = node
        sub.choices.protect = option
        sub.attack.methods = None
        sub.run_dir = str(run.dir / option)
        if skipped:
            print(f"attack_all: {option} has no key(s) {', '.join(skipped)}: not applied")
        print(f"attack_all: {option} -> {sub.run_dir}")
        mode = os.environ.get("WANDB_MODE")
        sub_run = Run(sub)
        try:
            results = run_one(sub, sub_run)
            sub_run.add_results(**results)
        finally:
            sub_run.finish()
            # wandb leaves WANDB_MODE=dryrun behind after an offline run, which the next Run refuses
            if mode is None:
                os.environ.pop("WANDB_MODE", None)
            else:
                os.environ["WANDB_MODE"] = mode
        if not results:  # not rank 0
            continue
        summary[option] = {
            **results["attack"]["summary"],
            **{f"reid_recon_{n}": m["match_recon"] for n, m in results["attack"]["reid"].items()},
            **{f"reid_protected_{n}": m["match_protected"] for n, m in results["attack"]["reid"].items()},
            "steps": results["training"]["steps"],
            "seconds": results["training"]["seconds"],
            "run_dir": sub_run.results_path.parent.as_posix(),
        }
    if summary:
        columns = ["method", *[k for k in next(iter(summary.values())) if k != "run_dir"]]
        rows = [[name, *[s[k] for k in columns[1:]]] for name, s in summary.items()]
        print(format_table(columns, rows))
        run.log_table("attack/methods", columns, rows)
    return {"methods": summary}


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    if cfg.attack.methods:
        return run_all(cfg, run)
    return run_one(cfg, run)
