"""Recognizers from ONNX files described by `<models_dir>/models.json`, run as PyTorch.

Two backends turn a graph into ordinary modules (input gradients, autocast and `.to(device)` work
as for any network): `native` (ppfr.recognizers.native: fused modules with the file's weights,
1.2-9x faster forward+backward on CPU, bench/recognizers.py) for the shared architectures it
knows, and `onnx` (onnx2torch, node by node) for these and any other graph. Both match
onnxruntime (cos >= 0.9999, tests/test_native.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx2torch import convert
from torch import nn

from ppfr.errors import ModelError
from ppfr.recognizers.base import Recognizer, affine_from_points, file_sha256
from ppfr.recognizers.native import ARCHITECTURES

CATALOG = "models.json"
BACKENDS = ("native", "onnx")

# Fine-tuned siblings, as models.json's README states (it has no field for it): hse_faceres_deep is a
# re-trained hse_faceres (weight correlation ~0.995), so the two never count as independent models.
# An entry may also carry its own "family" field, which wins.
SIBLINGS = {"hse_faceres_deep": "hse_faceres"}

_FORMULA = re.compile(r"^\(x\s*-\s*([0-9.]+)\)\s*/\s*([0-9.]+)$")


def load_catalog(models_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The usable entries of models.json by name."""
    path = Path(models_dir) / CATALOG
    if not path.is_file():
        raise ModelError(f"{path}: model catalog not found (is models_dir right?)")
    try:
        entries = json.loads(path.read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{path}: cannot read the model catalog ({err})") from err
    return {e["name"]: e for e in entries if e.get("usable")}


def normalisation(entry: dict[str, Any], catalog: Path) -> tuple[list[float], list[float]]:
    """(mean, std) on the 0..255 scale from the entry's formula; in-graph or none means raw 0..255."""
    formula = entry["normalisation"]["formula"].strip()
    if formula.startswith(("in-graph", "none")):
        return [0.0] * 3, [1.0] * 3
    match = _FORMULA.match(formula)
    if not match:
        raise ModelError(
            f"{catalog}: {entry['name']}: normalisation formula {formula!r} is not of the form (x - m) / s"
        )
    mean, std = float(match[1]), float(match[2])
    return [mean] * 3, [std] * 3


def flush_subnormals(network: nn.Module) -> nn.Module:
    """Set weights below their dtype's smallest normal number (float32: 1.2e-38) to zero, in place.

    Why: x86 CPUs compute with subnormal operands many times slower. faceplugin_mobilefacenet's
    folded weights hold thousands of them; its 1x1 convolutions ran 20-40x slower than its
    siblings' on an Intel Xeon (bench/recognizers.py). Their size keeps the embeddings unchanged.
    """
    with torch.no_grad():
        for tensor in (*network.parameters(), *network.buffers()):
            if tensor.is_floating_point():
                tensor.masked_fill_(tensor.abs() < torch.finfo(tensor.dtype).tiny, 0.0)
    return network


def create_onnx(
    entry: dict[str, Any], models_dir: str | Path, backend: str = "native", channels_last: bool = True
) -> Recognizer:
    """Check the file's hash, convert it, and wrap it with the entry's preprocessing.

    backend "native" uses the native module where one exists for this model, onnx2torch otherwise;
    `channels_last` stores a native module's weights channels-last, which its convolutions follow.
    """
    catalog = Path(models_dir) / CATALOG
    path = Path(models_dir) / entry["file"]
    if not path.is_file():
        raise ModelError(f"{path}: model file of {entry['name']} not found (listed in {catalog})")
    actual = file_sha256(path)
    if actual != entry["sha256"]:
        raise ModelError(
            f"{path}: sha256 mismatch: expected {entry['sha256']} (from {catalog}), got {actual}"
        )
    order = entry["channel_order"].split()[0]
    if order not in ("RGB", "BGR"):
        raise ModelError(
            f"{catalog}: {entry['name']}: channel_order {entry['channel_order']!r} is neither RGB nor BGR"
        )
    mean, std = normalisation(entry, catalog)
    native = ARCHITECTURES.get(entry["name"]) if backend == "native" else None
    try:
        model = onnx.load(str(path))
        network = native(model, path) if native else convert(model)
    except ModelError:
        raise
    except Exception as err:  # onnx/onnx2torch raise many kinds for a bad graph
        raise ModelError(f"{path}: cannot convert the ONNX graph to PyTorch ({err})") from err
    if native:
        network = flush_subnormals(network)
        if channels_last:  # 15-50 % faster on CPU and on a warm GPU (bench/recognizers.py)
            network = network.to(memory_format=torch.channels_last)
    return Recognizer(
        name=entry["name"],
        network=network,
        embedding_dim=int(entry["embedding_dim"]),
        family=entry.get("family") or SIBLINGS.get(entry["name"], entry["name"]),
        input_size=tuple(entry["input_size"]),
        affine=affine_from_points(entry["alignment"]["points_xy"]),
        bgr=order == "BGR",
        mean=mean,
        std=std,
        sha256=actual,
    )
