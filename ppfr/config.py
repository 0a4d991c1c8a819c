"""Config composition with omegaconf alone: `configs/config.yaml` + one YAML per group choice + experiment.

Order of precedence, lowest first: `config.yaml`, the group options it names under `defaults`,
the experiment's `defaults` (group choices) and keys, then the command line. Every key is
checked: an unknown key or group option is a ConfigError that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ppfr.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# A group whose option may also be a plain value (not a YAML file): `recognizer=mobilefacenet_tf`
# or `recognizer=[a,b]` sets `recognizer.names` on top of the option `config.yaml` chooses.
VALUE_GROUPS = {"recognizer": "names"}


def groups(config_dir: Path = CONFIG_DIR) -> dict[str, list[str]]:
    """Config groups (sub-folders) and their options (YAML files), experiments included."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(config_dir.iterdir())
        if d.is_dir() and not d.name.startswith((".", "_"))
    }


def _load(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config file must hold a mapping")
    return cfg


def _option_path(config_dir: Path, group: str, option: str) -> Path:
    options = groups(config_dir).get(group, [])
    if option not in options:
        raise ConfigError(f"unknown option {group}={option}; valid options: {', '.join(options)}")
    return config_dir / group / f"{option}.yaml"


def _defaults(cfg: DictConfig) -> dict[str, Any]:
    """Pop a file's `defaults:` mapping (group -> option)."""
    node = cfg.pop("defaults", None)
    return dict(OmegaConf.to_container(node)) if node is not None else {}


def _parse_argv(argv: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r} is not of the form key=value (see --help)")
        pairs.append((key.strip(), value))
    return pairs


def _open_empty_dicts(cfg: DictConfig) -> None:
    """Empty mappings in defaults (e.g. `recognizer.weights: {}`) take user keys; all else is strict."""
    OmegaConf.set_struct(cfg, True)
    for key in cfg:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            if len(node) == 0:
                OmegaConf.set_struct(node, False)
            else:
                _open_empty_dicts(node)


def _merge_checked(cfg: DictConfig, update: DictConfig | dict, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, update)
    except ConfigKeyError as e:
        key = e.full_key or e.key
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else cfg
        valid = ", ".join(str(k) for k in node) if isinstance(node, DictConfig) else "(none)"
        raise ConfigError(f"unknown config key {key!r} ({where}); valid keys here: {valid}") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config value ({where}): {e}") from e


def compose(argv: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose the run config from `key=value` arguments (omegaconf dotlist syntax)."""
    config_dir = Path(config_dir)
    args = _parse_argv(argv)
    known = groups(config_dir)
    base = _load(config_dir / "config.yaml")
    choices: dict[str, Any] = _defaults(base)
    base_choices = dict(choices)

    experiment = next((v for k, v in args if k == "experiment"), base.get("experiment"))
    exp = _load(_option_path(config_dir, "experiment", experiment))
    choices.update(_defaults(exp))
    base.experiment = experiment

    overrides = []
    for key, value in args:
        if key == "experiment":
            continue
        if key in known:
            choices[key] = yaml.safe_load(value) if value else value
        elif key.split(".")[0] in base or key.split(".")[0] in choices:
            overrides.append(f"{key}={value}")
        else:
            valid = sorted({*base.keys(), *choices, "experiment"})
            raise ConfigError(
                f"unknown config key {key!r}; valid top-level keys and groups: {', '.join(valid)}"
            )

    cfg = base
    for group, option in choices.items():
        if group in VALUE_GROUPS and not (isinstance(option, str) and option in known.get(group, [])):
            node = _load(_option_path(config_dir, group, base_choices[group]))
            node[VALUE_GROUPS[group]] = option
        else:
            node = _load(_option_path(config_dir, group, str(option)))
        cfg[group] = node
    cfg.choices = {g: (o if isinstance(o, str) else list(o)) for g, o in choices.items()}
    _open_empty_dicts(cfg)
    cfg = _merge_checked(cfg, exp, f"experiment {experiment}")
    try:
        cli = OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from e
    cfg = _merge_checked(cfg, cli, "command line")
    return cfg


def to_dict(cfg: DictConfig | ListConfig) -> Any:
    """A resolved plain-python copy (what constructors and loggers get)."""
    return OmegaConf.to_container(cfg, resolve=True)


def help_text(config_dir: Path = CONFIG_DIR) -> str:
    lines = [
        "usage: python -m ppfr.fit [experiment=NAME] [GROUP=OPTION ...] [dotted.key=value ...]",
        "",
        "Groups and their options (configs/<group>/<option>.yaml):",
    ]
    for group, options in groups(config_dir).items():
        lines.append(f"  {group:<12} {', '.join(options)}")
    lines += [
        "",
        "recognizer= also takes a recognizer name or a list: recognizer=[mobilefacenet_tf,dlib_resnet]",
        "Examples:",
        "  python -m ppfr.fit experiment=data_check data=lfw data.root=../shared/data/faces-mini/lfw",
        "  python -m ppfr.fit experiment=verify recognizer=all logger=csv print_config=true",
        "print_config=true prints the resolved config; run_dir=PATH sets the run directory.",
    ]
    return "\n".join(lines)
