"""Config composition with omegaconf alone: `configs/config.yaml` + one YAML per group choice + experiment.

Order of precedence, lowest first: `config.yaml`, the group options it names under `defaults`,
the experiment's `defaults` (group choices) and keys, then the command line. Every key is
checked: an unknown key or group option, a value of the wrong type or out of range is a
ConfigError that names the key and lists what is valid.

A group option may extend another option of its group: a first key `defaults: [OTHER]` merges
OTHER's keys first, then the file's own (chains allowed). Extending a listed option may only
change its keys (a typo is an error); extending a `_`-prefixed base file (not an option itself)
may also add keys, so datasets share `configs/data/_base.yaml` and add their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from ppfr.errors import ConfigError, check_choice


def _config_dir() -> Path:
    """The installed `configs` package (wheel or editable install), else the checkout's `configs/`."""
    try:
        found = Path(str(resources.files("configs")))
    except (ModuleNotFoundError, TypeError):
        found = None
    if found is not None and (found / "config.yaml").is_file():
        return found
    return Path(__file__).resolve().parents[1] / "configs"


CONFIG_DIR = _config_dir()

# A group whose option may also be a plain value (not a YAML file): `recognizer=mobilefacenet_tf`
# or `recognizer=[a,b]` sets `recognizer.names` on top of the option `config.yaml` chooses.
VALUE_GROUPS = {"recognizer": "names"}

# Ranges of numeric keys, checked wherever the value comes from: (lowest, highest or None).
# A null value is accepted where the default is null. Method keys are checked by the methods.
RANGES: dict[str, tuple[int, int | None]] = {
    "seed": (0, 2**32 - 1),
    "threads": (1, None),
    "generate.batch_size": (1, None),
    "generate.shard_size": (1, None),
    "eval.batch_size": (1, None),
    "eval.grid": (0, None),
    "data.batch_size": (1, None),
    "data.num_workers": (0, None),
    "data.subset.identities": (1, None),
    "data.subset.pairs": (1, None),
    "recognizer.batch_size": (1, None),
}
THRESHOLD_SOURCES = ("file", "nearest", "in_run", "auto")  # where evaluation takes its thresholds from
CHOICES: dict[str, tuple[str, ...]] = {"eval.threshold_source": THRESHOLD_SOURCES}
# Types a key takes beyond those its values in the shipped options show (see `_expected`).
MORE_TYPES: dict[str, set[str | None]] = {
    "trainer.devices": {"list"},  # device indices, e.g. [0, 1]
    "trainer.precision": {"int"},  # Lightning's 16, 32, 64
}


def groups(config_dir: Path = CONFIG_DIR) -> dict[str, list[str]]:
    """Config groups (sub-folders) and their options (YAML files not starting with `_`), experiments included."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml") if not p.name.startswith("_"))
        for d in sorted(Path(config_dir).iterdir())
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


def _split_defaults(node: DictConfig, path: Path, group: str) -> tuple[list[str], dict[str, Any]]:
    """Pop a file's `defaults`: the options of its own group it extends, and (experiments) group choices."""
    raw = node.pop("defaults", None)
    raw = OmegaConf.to_container(raw) if raw is not None else []
    items = [raw] if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise ConfigError(f"{path}: defaults must be a list of options of {group}/ (or group: option pairs)")
    bases = [item for item in items if isinstance(item, str)]
    choices: dict[str, Any] = {}
    for item in items:
        if isinstance(item, dict) and group in ("", "experiment"):
            choices.update(item)
        elif not isinstance(item, str):
            raise ConfigError(
                f"{path}: defaults entry {item!r} is not an option of {group}/ "
                "(group choices belong in configs/config.yaml or an experiment)"
            )
    return bases, choices


def _strict(node: DictConfig) -> DictConfig:
    """`node` refusing new keys, except under empty mappings (e.g. `recognizer.weights: {}`)."""
    OmegaConf.set_struct(node, True)
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if len(child) == 0:
                OmegaConf.set_struct(child, False)
            else:
                _strict(child)
    return node


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


def _resolve_option(
    config_dir: Path, group: str, option: str, chain: tuple[str, ...] = ()
) -> tuple[DictConfig, dict[str, Any]]:
    """An option's keys with the options it extends merged under them, and its group choices."""
    path = Path(config_dir) / group / f"{option}.yaml"
    if option in chain:
        raise ConfigError(f"{path}: defaults form a cycle: {' -> '.join((*chain, option))}")
    if chain and not path.is_file():
        options = ", ".join(groups(config_dir).get(group, []))
        raise ConfigError(
            f"{config_dir / group / chain[-1]}.yaml extends {option!r}, which is not in {group}/ ({options})"
        )
    node = _load(path if chain else _option_path(Path(config_dir), group, option))
    bases, choices = _split_defaults(node, path, group)
    merged: DictConfig = OmegaConf.create({})
    merged_choices: dict[str, Any] = {}
    additive = True  # an empty start or a `_` base takes new keys; a listed option does not
    for base in bases:
        base_node, base_choices = _resolve_option(config_dir, group, base, (*chain, option))
        merged = OmegaConf.merge(merged, base_node)
        merged_choices.update(base_choices)
        additive = additive and base.startswith("_")
    if group != "experiment" and not additive:
        merged = _merge_checked(_strict(merged), node, f"{path} extends {', '.join(bases)}")
    else:
        merged = OmegaConf.merge(node, merged, node)  # values: base, then own; own keys listed first
    OmegaConf.set_struct(merged, False)
    return merged, {**merged_choices, **choices}


def load_option(group: str, option: str, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """`configs/<group>/<option>.yaml` as the run sees it: with the options it extends merged in."""
    return _resolve_option(Path(config_dir), group, option)[0]


def _parse_argv(argv: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r} is not of the form key=value (see --help)")
        pairs.append((key.strip(), value))
    return pairs


def _kind(value: Any) -> str | None:
    """The config type of a value: None, bool, int, float, str, list or mapping."""
    if value is None:
        return None
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(value, types):
            return kind
    return "list" if isinstance(value, list | tuple | ListConfig) else "mapping"


def _raw(node: Any, key: str) -> Any:
    """The unresolved value at dotted `key` of a plain container; an interpolation counts as unknown."""
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ...
        node = node[part]
    return ... if isinstance(node, str) and "${" in node else node


def _expected(cfg: DictConfig, key: str, config_dir: Path, known: dict[str, list[str]]) -> set[str | None]:
    """Types a key takes: its current value's and, inside a group, its value in any option of the group.

    `trainer.devices` is `auto` in one trainer option and `1` in another, so both str and int fit.
    """
    kinds: set[str | None] = set(MORE_TYPES.get(key, ()))
    try:
        kinds.add(_kind(OmegaConf.select(cfg, key)))
    except OmegaConfBaseException:
        return {None}
    group, _, sub = key.partition(".")
    if sub and group in known and group != "experiment":
        for option in known[group]:
            value = _raw(OmegaConf.to_container(load_option(group, option, config_dir)), sub)
            if value is not ...:
                kinds.add(_kind(value))
    return kinds


def _check_type(cfg: DictConfig, key: str, expected: set[str | None]) -> None:
    value = OmegaConf.select(cfg, key)
    kind = _kind(value)
    if None in expected or kind in expected or (kind == "int" and "float" in expected):
        return
    want = " or ".join(sorted(k for k in expected if k))
    shown = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
    shown = "null" if value is None else repr(shown)
    raise ConfigError(f"{key}={shown} has type {kind or 'null'}; expected {want}")


def check(cfg: DictConfig) -> None:
    """Generic ranges and choices of the keys in `config.yaml` and the data/recognizer options."""
    for key, (low, high) in RANGES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if _kind(value) != "int":
            raise ConfigError(f"{key}={value!r}: expected an integer")
        if value < low or (high is not None and value > high):
            raise ConfigError(f"{key}={value}: must be >= {low}" + (f" and <= {high}" if high else ""))
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            check_choice(key, value, valid)


def compose(argv: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose the run config from `key=value` arguments (omegaconf dotlist syntax)."""
    config_dir = Path(config_dir)
    args = _parse_argv(argv)
    known = groups(config_dir)
    base = _load(config_dir / "config.yaml")
    _, choices = _split_defaults(base, config_dir / "config.yaml", "")
    base_choices = dict(choices)

    experiment = next((v for k, v in args if k == "experiment"), base.get("experiment"))
    exp, exp_choices = _resolve_option(config_dir, "experiment", experiment)
    choices.update(exp_choices)
    base.experiment = experiment
    for section in [k for k in exp if k not in base and k not in choices]:
        base[section] = exp.pop(
            section
        )  # an experiment's own section (e.g. `transfer:`), strict from here on

    overrides = []
    for key, value in args:
        if key == "experiment":
            continue
        if key in known:
            try:
                choices[key] = yaml.safe_load(value) if value else value
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}={value}: cannot parse the option ({e})".replace("\n", " ")) from e
        elif key.split(".")[0] in base or key.split(".")[0] in choices:
            overrides.append((key, value))
        else:
            valid = sorted({*base.keys(), *choices, "experiment"})
            raise ConfigError(
                f"unknown config key {key!r}; valid top-level keys and groups: {', '.join(valid)}"
            )

    cfg = base
    for group, option in choices.items():
        if group in VALUE_GROUPS and not (isinstance(option, str) and option in known.get(group, [])):
            node = load_option(group, base_choices[group], config_dir)
            node[VALUE_GROUPS[group]] = option
        else:
            node = load_option(group, str(option), config_dir)
        cfg[group] = node
    cfg.choices = {g: (o if isinstance(o, str) else list(o)) for g, o in choices.items()}
    cfg = _merge_checked(_strict(cfg), exp, f"experiment {experiment}")
    for key, value in overrides:
        try:
            cli = OmegaConf.from_dotlist([f"{key}={value}"])
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse {key}={value}: {e}".replace("\n", " ")) from e
        expected = _expected(cfg, key, config_dir, known)
        cfg = _merge_checked(cfg, cli, "command line")
        try:
            _check_type(cfg, key, expected)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{key}={value}: {e}".replace("\n", " ")) from e
    try:
        check(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve the config: {e}".replace("\n", " ")) from e
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
        "print_config=true prints the resolved config and exits; run_dir=PATH sets the run directory.",
    ]
    return "\n".join(lines)
