"""A wheel, not an editable install, runs on its own: the configs ship inside it as package data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = (".venv", ".git", "outputs", ".cache", "*.egg-info", "__pycache__", "build", "wandb", "tests")


@pytest.mark.slow
def test_wheel_runs_help_and_a_data_check_outside_the_checkout(faces_mini, align_cache, tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and egg-info, which the checkout must not get
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src], check=True
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = {
        n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("configs/") and n.endswith(".yaml")
    }
    assert shipped == {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline"}

    def python(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True)

    where = python("-c", "import ppfr, ppfr.config as c; print(ppfr.__file__); print(c.CONFIG_DIR)")
    assert all(Path(line).is_relative_to(site) for line in where.stdout.split()), where.stdout + where.stderr

    helped = python("-m", "ppfr.fit", "--help")
    assert helped.returncode == 0 and "data_check" in helped.stdout and "lfw" in helped.stdout, helped.stderr

    ran = python(
        "-m",
        "ppfr.fit",
        "experiment=data_check",
        "data=lfw",
        f"data.root={faces_mini / 'lfw'}",
        "data.subset.pairs=2",
        "logger=csv",
        f"paths.cache={align_cache}",
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    (results,) = (elsewhere / "outputs" / "data_check").glob("*/results.json")
    saved = json.loads(results.read_text())
    assert saved["pairs"] == 2 and saved["images"] >= 3
