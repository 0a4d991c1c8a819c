"""The recognizer zoo: every usable model of `<models_dir>/models.json` plus PyTorch architectures
for checkpoints users bring (`weights`: name -> file), registered in `RECOGNIZERS`.

    rec = create("mobilefacenet_tf", models_dir)                   # native module, weights from the ONNX file
    rec = create("mobilefacenet_tf", models_dir, backend="onnx")   # the same file through onnx2torch
    rec = create("iresnet50", weights="r50/backbone.pth")
    emb = rec(crops)                                                # B x 3 x 112 x 112 in [0, 1] -> unit B x D
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ppfr.errors import ConfigError, check_choice
from ppfr.recognizers import facenet, iresnet  # noqa: F401  (they register themselves)
from ppfr.recognizers.base import RECOGNIZERS, Recognizer
from ppfr.recognizers.onnx import BACKENDS, create_onnx, load_catalog

__all__ = [
    "BACKENDS",
    "RECOGNIZERS",
    "Recognizer",
    "available",
    "check_disjoint",
    "create",
    "create_many",
    "from_config",
]


def available(models_dir: str | Path | None) -> list[str]:
    """Usable ONNX models of the catalog, then the PyTorch architectures."""
    onnx_names = list(load_catalog(models_dir)) if models_dir is not None else []
    return onnx_names + RECOGNIZERS.names()


def create(
    name: str,
    models_dir: str | Path | None = None,
    weights: str | Path | None = None,
    backend: str = "native",
    channels_last: bool = True,
) -> Recognizer:
    """One recognizer by name: an ONNX model from `models_dir` (run by `backend`: native or onnx;
    a native module's weights `channels_last` or not), or a PyTorch architecture with `weights`."""
    check_choice("recognizer.backend", backend, BACKENDS)
    if name in RECOGNIZERS:
        if weights is None:
            raise ConfigError(
                f"recognizer {name!r} is a PyTorch architecture and needs a weight file: set recognizer.weights.{name}=<path>"
            )
        return RECOGNIZERS.create(name, name, weights)
    if models_dir is None:
        raise ConfigError(f"recognizer {name!r}: set recognizer.models_dir (the folder holding models.json)")
    catalog = load_catalog(models_dir)
    if name not in catalog:
        raise ConfigError(
            f"{RECOGNIZERS.key}: unknown recognizer {name!r}; available: {', '.join(available(models_dir))}"
        )
    if weights is not None:
        raise ConfigError(
            f"recognizer {name!r} is an ONNX model of {models_dir}; weights apply to {', '.join(RECOGNIZERS.names())} only"
        )
    return create_onnx(catalog[name], models_dir, backend, channels_last)


def create_many(
    names: str | Sequence[str],
    models_dir: str | Path | None,
    weights: Mapping[str, str | Path] | None = None,
    backend: str = "native",
    channels_last: bool = True,
) -> list[Recognizer]:
    """Several recognizers; `names="all"` means every usable ONNX model of the catalog."""
    if names == "all":
        if models_dir is None:
            raise ConfigError(
                "recognizer names=all: set recognizer.models_dir (the folder holding models.json)"
            )
        names = list(load_catalog(models_dir))
    elif isinstance(names, str):
        names = [names]
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise ConfigError(f"recognizer names list {', '.join(repeated)} more than once")
    weights = weights or {}
    return [create(n, models_dir, weights.get(n), backend, channels_last) for n in names]


def check_disjoint(ensemble: Sequence[Recognizer], blackbox: Sequence[Recognizer]) -> None:
    """A black box must be independent of every ensemble member: not the same model, not a sibling."""
    for box in blackbox:
        for member in ensemble:
            if box.name == member.name:
                raise ConfigError(f"recognizer {box.name!r} is both in the ensemble and a black box")
            if box.family == member.family:
                raise ConfigError(
                    f"black box {box.name!r} and ensemble member {member.name!r} are siblings "
                    f"(family {box.family!r}): a black box must be independent of the ensemble"
                )


def from_config(names: str | Sequence[str], cfg: Mapping[str, Any]) -> list[Recognizer]:
    """Recognizers by name as the run's `recognizer.*` node configures them (models_dir, weights,
    backend, channels_last)."""
    weights = {str(k): v for k, v in (cfg.get("weights") or {}).items()}
    return create_many(
        names,
        cfg.get("models_dir"),
        weights,
        backend=cfg.get("backend", "native"),
        channels_last=bool(cfg.get("channels_last", True)),
    )
