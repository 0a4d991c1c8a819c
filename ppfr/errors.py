"""The three kinds of bad input ppfr reports; each message names the file or key and the problem."""

from collections.abc import Collection
from typing import Any


class ConfigError(ValueError):
    """A config key, group option or value that does not exist or does not fit."""


class DataError(ValueError):
    """An image, list or dataset folder that is missing, unreadable or malformed."""


class ModelError(ValueError):
    """A weight file that is missing, has the wrong hash, or does not fit its architecture."""


def check_choice(key: str, value: Any, choices: Collection[str]) -> None:
    """A ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
