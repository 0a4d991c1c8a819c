"""Recognizers from ONNX files described by `<models_dir>/models.json`, run as PyTorch via onnx2torch.

onnx2torch turns the graph into ordinary modules, so input gradients, autocast and `.to(device)`
work as for any network; the conversion matches onnxruntime to ~1e-5.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import onnx
from onnx2torch import convert

from ppfr.errors import ModelError
from ppfr.recognizers.base import Recognizer, affine_from_points

CATALOG = "models.json"

# Fine-tuned siblings, as models.json's README states (it has no field for it): hse_faceres_deep is a
# re-trained hse_faceres (weight correlation ~0.995), so the two never count as independent models.
# An entry may also carry its own "family" field, which wins.
SIBLINGS = {"hse_faceres_deep": "hse_faceres"}

_FORMULA = re.compile(r"^\(x\s*-\s*([0-9.]+)\)\s*/\s*([0-9.]+)$")
_verified: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256, per process


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


def sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per (path, mtime, size) in this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _verified:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _verified[key] = digest.hexdigest()
    return _verified[key]


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


def create_onnx(entry: dict[str, Any], models_dir: str | Path) -> Recognizer:
    """Check the file's hash, convert it, and wrap it with the entry's preprocessing."""
    catalog = Path(models_dir) / CATALOG
    path = Path(models_dir) / entry["file"]
    if not path.is_file():
        raise ModelError(f"{path}: model file of {entry['name']} not found (listed in {catalog})")
    actual = sha256(path)
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
    try:
        network = convert(onnx.load(str(path)))
    except Exception as err:  # onnx/onnx2torch raise many kinds for a bad graph
        raise ModelError(f"{path}: cannot convert the ONNX graph to PyTorch ({err})") from err
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
    )
