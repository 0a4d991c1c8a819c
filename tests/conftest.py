"""Shared fixtures: the real shared data and models at ``../shared`` (or ``$PPFR_SHARED``).

Tests that need them skip with the reason when the folder is absent; CI sets
``PPFR_REQUIRE_SHARED=1`` so that a missing folder fails the run instead of skipping it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PPFR_SHARED", ROOT.parent / "shared")).resolve()


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        msg = f"{what} not found at {path}: these tests use the real shared data (set PPFR_SHARED)"
        if os.environ.get("PPFR_REQUIRE_SHARED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(SHARED, "the shared folder")


@pytest.fixture(scope="session")
def faces_mini(shared) -> Path:
    return _need(shared / "data" / "faces-mini", "faces-mini")


@pytest.fixture(scope="session")
def lfw_train(shared) -> Path:
    return _need(shared / "data" / "lfw-train", "lfw-train")


@pytest.fixture(scope="session")
def models_dir(shared) -> Path:
    return _need(shared / "models", "the ONNX models folder")


@pytest.fixture(scope="session")
def align_cache(tmp_path_factory) -> Path:
    """One alignment cache for the whole session, so each photo is detected once."""
    return Path(os.environ.get("PPFR_TEST_CACHE") or tmp_path_factory.mktemp("align_cache"))


def first_faces(root: Path, align_cache: Path, n: int, subset: str = "lfw"):
    """The first photo of each of the first `n` identities of `root`/`subset` (a folder with a
    manifest.csv; default faces-mini/lfw), aligned: n x 3 x 112 x 112 in [0,1]."""
    import csv

    import numpy as np
    import torch

    from ppfr.align import Aligner

    with open(root / subset / "manifest.csv") as f:
        first: dict[str, str] = {}
        for row in csv.DictReader(f):
            first.setdefault(row["identity"], row["relative_path"])
    aligner = Aligner(cache_dir=align_cache, on_no_face="center_crop")
    crops = np.stack([aligner.align(root / subset / p).crop for p in list(first.values())[:n]])
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
