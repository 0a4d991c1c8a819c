"""The interface every protection method implements, and config helpers shared by the methods."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_type_hints

from torch import Tensor, nn

from ppfr.errors import ConfigError, DataError
from ppfr.registry import Registry

T = TypeVar("T")


class ProtectionMethod(nn.Module):
    """Maps aligned faces X (B x 3 x H x W in [0,1]) to protected faces X' of the same shape.

    ``seeds`` (int64, one per item) drive every random draw for that item, through its own
    ``torch.Generator``: an item's output depends only on its seed and its input, whatever the
    batch or device split. ``stochastic`` says whether X -> X' is not a function of X alone;
    ``needs_training`` whether the transform has learned weights that must be trained or loaded
    first (a method whose only learned part is its own recognizer does not).

    Three views of a protected face, so every table compares like with like: ``forward`` the
    image a person or a black-box recognizer sees, ``represent`` what the method's own recognizer
    consumes, ``attacker_input`` what a reconstruction attacker is given (``attacker_channels``
    channels). For image-domain methods all three are X'.
    """

    name: str = ""
    stochastic: bool = False
    needs_training: bool = False
    attacker_channels: int = 3

    def forward(self, x: Tensor, seeds: Tensor) -> Tensor:
        raise NotImplementedError

    def stages(self, x: Tensor, seeds: Tensor) -> dict[str, Tensor]:
        """Named intermediate images for grids; methods with visible steps add theirs."""
        return {"original": x, "protected": self(x, seeds)}

    def represent(self, x: Tensor, seeds: Tensor) -> Tensor:
        """What the method's own recognizer consumes (B x C x H' x W')."""
        return self(x, seeds)

    def attacker_input(self, x: Tensor, seeds: Tensor) -> Tensor:
        """What a reconstruction attacker is given: B x ``attacker_channels`` x H' x W'."""
        return self(x, seeds)


METHODS: Registry[ProtectionMethod] = Registry("protection method", key="protect.name")


def check_batch(x: Tensor, seeds: Tensor, method: str) -> None:
    """Refuse inputs that break the contract, naming what is wrong."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise DataError(f"{method}: expected a B x 3 x H x W image batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DataError(f"{method}: expected float images in [0,1], got {x.dtype}")
    if seeds.ndim != 1 or len(seeds) != len(x):
        raise DataError(f"{method}: expected one seed per image ({len(x)}), got shape {tuple(seeds.shape)}")


def plain(value: Any) -> Any:
    """Mappings and lists (omegaconf nodes included) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def part(cls: type[T], value: Mapping | T | None, key: str) -> T:
    """Build the dataclass ``cls`` from a config mapping; unknown keys are a ConfigError naming ``key``."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{key}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for name, v in plain(value).items():
        sub = hints[name]
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            v = part(sub, v, f"{key}.{name}")
        kwargs[name] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)
