"""Evaluation of a protected set written on disk: thresholds by calibration key, the grid from stored
PNGs (the method is never run), and a clear error when the data differs from the set's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import datamodules
from ppfr import recognizers
from ppfr.config import compose, to_dict
from ppfr.errors import ConfigError, DataError
from ppfr.evaluate import evaluate_set, impostor_accepts
from ppfr.generate import ProtectedSet, safe_name
from ppfr.io import load_png, save_png
from ppfr.run import Run
from ppfr.verification import measured_on, save_calibration

MODEL = "mobileface_becauseofai"  # the smallest model of the zoo
TILE = 112 + 2  # make_grid's default padding is 2 px


def config(tmp_path: Path, faces_mini, models_dir, align_cache, pairs: int, *extra: str):
    return compose(
        [
            "experiment=evaluate", "logger=csv", f"data.root={faces_mini / 'lfw'}", f"data.cache_dir={align_cache}",
            f"data.subset.pairs={pairs}", f"paths.models={models_dir}", f"calibration_file={tmp_path / 'cal.json'}",
            f"run_dir={tmp_path / f'run{pairs}'}",
            "eval.grid=2", f"eval.blackbox=[{MODEL}]", *extra,
        ]
    )  # fmt: skip


def write_set(set_dir: Path, dm) -> list[dict]:
    """A finished set without any method: X' = X with its left half grey."""
    records = []
    for index, item_id in enumerate(dm.dataset.ids):
        item = dm.dataset[index]
        protected = item["image"].clone()
        protected[:, :, :56] = 0.5
        path = set_dir / "shards" / "0000" / f"{safe_name(item_id)}.png"
        save_png(protected, path)
        records.append({"id": item_id, "index": index, "label": item["label"], "seed": index,
                        "path": str(path.relative_to(set_dir)), "config_hash": "test"})  # fmt: skip
    (set_dir / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def tile(grid: np.ndarray, k: int, per_row: int = 4) -> torch.Tensor:
    y, x = 2 + (k // per_row) * TILE, 2 + (k % per_row) * TILE
    return torch.from_numpy(grid[y : y + 112, x : x + 112].copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def blackbox(models_dir):
    return [recognizers.create(MODEL, models_dir)]


@pytest.fixture
def made(tmp_path, faces_mini, models_dir, align_cache):
    """A set made on the first 4 pairs, in the folder layout of a protect run (config.yaml beside it)."""
    cfg = config(tmp_path, faces_mini, models_dir, align_cache, 4)
    (tmp_path / "made").mkdir()
    OmegaConf.save(cfg, tmp_path / "made" / "config.yaml", resolve=True)
    dm = datamodules.create(to_dict(cfg.data))
    records = write_set(tmp_path / "made" / "protected", dm)
    return cfg, dm, ProtectedSet(tmp_path / "made" / "protected"), records


@pytest.mark.slow
def test_grid_shows_the_stored_stages_and_never_runs_a_method(made, blackbox):
    cfg, dm, protected, records = made
    grid_dir = protected.dir / "grid"
    grid_dir.mkdir()
    red, green = torch.zeros(3, 112, 112), torch.zeros(3, 112, 112)
    red[0], green[1] = 1, 1
    for r in records[:2]:
        save_png(red, grid_dir / f"{safe_name(r['id'])}.F.png")
        save_png(green, grid_dir / f"{safe_name(r['id'])}.C.png")
    run = Run(cfg)
    results = evaluate_set(cfg, run, dm, protected, blackbox=blackbox)
    m = results["eval"]["blackbox"][MODEL]
    assert m["threshold_source"] == "clean pairs of this run" and 0 <= m["match_far"] <= 1
    assert results["eval"]["summary"]["n_images"] == len(records) == 7
    grid = np.asarray(Image.open(run.dir / "images" / "eval_grid.png").convert("RGB"))
    assert grid.shape == (2 * TILE + 2, 4 * TILE + 2, 3)  # two faces: original | F | C | protected
    for face, r in enumerate(records[:2]):
        assert torch.allclose(tile(grid, 4 * face), dm.dataset[r["index"]]["image"], atol=1 / 255)
        assert torch.equal(tile(grid, 4 * face + 1), red) and torch.equal(tile(grid, 4 * face + 2), green)
        assert torch.equal(tile(grid, 4 * face + 3), load_png(protected.dir / r["path"]))

    # Without stored stages: original | protected, still without any method.
    for png in grid_dir.iterdir():
        png.unlink()
    evaluate_set(cfg, run, dm, protected, blackbox=blackbox)
    grid = np.asarray(Image.open(run.dir / "images" / "eval_grid.png").convert("RGB"))
    assert grid.shape == (2 * TILE + 2, 2 * TILE + 2, 3)  # one face a row
    assert torch.equal(tile(grid, 1, per_row=2), load_png(protected.dir / records[0]["path"]))
    assert torch.equal(tile(grid, 3, per_row=2), load_png(protected.dir / records[1]["path"]))


@pytest.mark.slow
def test_thresholds_come_from_the_entry_of_this_data_and_flip(made, blackbox, tmp_path, recwarn):
    cfg, dm, protected, _ = made
    unflipped = OmegaConf.merge(cfg, {"recognizer": {"flip": False}})
    stored = {"threshold": 0.25, "threshold_far_1e-2": 0.3, "threshold_far_1e-3": 0.35, "accuracy": 1.0,
              "protocol": "p", "n_pairs": 4}  # fmt: skip
    save_calibration(cfg.calibration_file, measured_on(unflipped, blackbox[0]), stored)
    strict = OmegaConf.merge(cfg, {"eval": {"threshold_source": "file"}})
    with pytest.raises(ConfigError, match=r"cal\.json: .*differs in flip: calibrated False, here True"):
        evaluate_set(strict, Run(strict), dm, protected, blackbox=blackbox)
    nearest = OmegaConf.merge(cfg, {"eval": {"threshold_source": "nearest"}})
    m = evaluate_set(nearest, Run(nearest), dm, protected, blackbox=blackbox)["eval"]["blackbox"][MODEL]
    assert "flip: calibrated False, here True" in str(recwarn.pop(UserWarning).message)
    assert m["flip"] is False  # embedded as the calibration was measured
    assert (m["threshold"], m["threshold_far"]) == (0.25, 0.35)
    assert m["threshold_source"] == "file (nearest: flip: calibrated False, here True)"
    save_calibration(cfg.calibration_file, measured_on(cfg, blackbox[0]), {**stored, "threshold": 0.2})
    m = evaluate_set(strict, Run(strict), dm, protected, blackbox=blackbox)["eval"]["blackbox"][MODEL]
    assert (m["threshold"], m["flip"], m["threshold_source"]) == (0.2, True, "file")


def test_a_set_of_other_data_names_both(made, tmp_path, faces_mini, models_dir, align_cache):
    _, _, protected, _ = made
    cfg = config(tmp_path, faces_mini, models_dir, align_cache, 2)
    dm = datamodules.create(to_dict(cfg.data))
    with pytest.raises(DataError) as err:
        evaluate_set(cfg, Run(cfg), dm, protected)
    message = str(err.value)
    root = (faces_mini / "lfw").resolve()
    assert "the set was made from other data or another subset than this run" in message
    assert (
        f"made from lfw at {root} (pairs.txt, subset pairs=4) ({protected.dir.parent / 'config.yaml'})"
        in message
    )
    assert f"this run uses lfw at {root} (pairs.txt, subset pairs=2)" in message
    # A set that records its data in meta.json (as generation writes it) is named from there.
    (protected.dir.parent / "config.yaml").unlink()
    data = {"name": "lfw", "root": str(faces_mini / "lfw"), "subset": {"pairs": 4, "identities": None}}
    (protected.dir / "meta.json").write_text(json.dumps({"config_hash": "x", "data": data}))
    with pytest.raises(DataError, match=r"made from lfw at .* \(subset pairs=4\) \(.*meta\.json\), this run"):
        evaluate_set(cfg, Run(cfg), dm, protected)


def test_impostor_accepts_counts_the_pairs_protection_changed():
    """Four people, one face each: the protected probe of person 0 drifts onto person 1, so exactly
    one ordered pair is accepted with it that the clean probe did not pass; unchanged probes change nothing."""
    clean = torch.eye(4)
    labels = torch.arange(4)
    same = impostor_accepts(clean, clean.clone(), labels, 0.5)
    assert same["impostor_pairs"] == 12 and same["far_protected"] == same["far_clean"] == 0.0
    assert same["far_protected_only"] == same["far_clean_only"] == 0 and same["far_excess_p"] == 1.0
    drifted = clean.clone()
    drifted[0] = torch.nn.functional.normalize(torch.tensor([0.6, 0.8, 0.0, 0.0]), dim=0)
    m = impostor_accepts(clean, drifted, labels, 0.5)
    assert m["far_protected"] == 1 / 12 and m["far_clean"] == 0.0
    assert (m["far_protected_only"], m["far_clean_only"]) == (1, 0) and m["far_excess_p"] == 0.5
    assert (m["far_probes_more"], m["far_probes_fewer"]) == (1, 0) and m["far_excess_p_probes"] == 0.5
    # One probe drifting onto three people: three discordant pairs, but one face's vote.
    spread = torch.nn.functional.normalize(
        torch.tensor([[0.1, 1.0, 1.0, 1.0]] + torch.eye(4)[1:].tolist()), dim=1
    )
    m = impostor_accepts(clean, spread, labels, 0.5)
    assert (m["far_protected_only"], m["far_probes_more"], m["far_probes_fewer"]) == (3, 1, 0)
    assert m["far_excess_p"] == 0.125 and m["far_excess_p_probes"] == 0.5
    # One person only: no impostor pairs, so no FAR and no scores rather than a division by zero.
    alone = impostor_accepts(clean[:2], clean[:2], torch.zeros(2, dtype=torch.long), 0.5)
    assert alone["impostor_pairs"] == 0 and alone["far_excess_p"] == 1.0
    assert all(math.isnan(alone[k]) for k in ("far_protected", "far_clean", "impostor_cos_std_clean"))


def test_impostor_residual_splits_a_far_change_into_a_common_shift_and_the_kept_identity():
    """Every probe moved the same way (a protection's signature, here along a direction no clean face
    has): the residuals are all common, and taking their mean out gives back the clean probes and
    their FAR. Independent residuals share little. The kept-identity FAR follows each probe's own
    residual direction at cos a to its clean self."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.normalize(
        torch.cat([torch.randn(300, 15, generator=gen), torch.zeros(300, 1)], 1), dim=1
    )
    labels = torch.arange(300) // 3
    signed = torch.nn.functional.normalize(clean + 0.8 * torch.eye(16)[15], dim=1)
    m = impostor_accepts(clean, signed, labels, 0.3)
    assert m["impostor_residual_common"] == pytest.approx(1.0, abs=1e-5)
    assert m["far_protected"] < m["far_clean"] and m["far_protected_without_common"] == m["far_clean"]
    noisy = torch.nn.functional.normalize(clean + 0.8 * torch.randn(300, 16, generator=gen), dim=1)
    m = impostor_accepts(clean, noisy, labels, 0.3)
    assert m["impostor_residual_common"] < 0.3
    r = torch.nn.functional.normalize(noisy - (noisy * clean).sum(1, keepdim=True) * clean, dim=1)
    other = labels[:, None] != labels[None, :]
    far = ((0.6 * clean + 0.8 * r) @ clean.T > 0.3)[other].float().mean().item()
    assert m["far_by_kept_cos"]["0.60"] == pytest.approx(far, abs=2 / other.sum().item())
    assert list(m["far_by_kept_cos"]) == ["0.95", "0.90", "0.80", "0.70", "0.60", "0.50", "0.40"]
    unchanged = impostor_accepts(clean, clean, labels, 0.3)  # no residual: nothing is common
    assert math.isnan(unchanged["impostor_residual_common"])
    assert unchanged["far_protected_without_common"] == unchanged["far_clean"]


def test_impostor_scores_explain_a_far_change_over_chunks():
    """The impostor score statistics equal a direct computation over every different-identity pair,
    across the 1024-row chunks; an unchanged probe gives slope 1 and equal means, a probe pulled
    halfway toward another person a mean above clean."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.nn.functional.normalize(torch.randn(1100, 8, generator=gen), dim=1)
    labels = torch.arange(1100) // 2
    same = impostor_accepts(clean, clean, labels, 0.9)
    assert abs(same["impostor_cos_slope"] - 1) < 1e-9
    assert same["impostor_cos_mean_protected"] == pytest.approx(same["impostor_cos_mean_clean"], abs=1e-12)
    noisy = torch.nn.functional.normalize(clean + 0.5 * torch.randn(1100, 8, generator=gen), dim=1)
    m = impostor_accepts(clean, noisy, labels, 0.9)
    other = labels[:, None] != labels[None, :]
    x, y = (clean @ clean.T)[other].double(), (noisy @ clean.T)[other].double()
    assert m["impostor_cos_mean_clean"] == pytest.approx(float(x.mean()), abs=1e-9)
    assert m["impostor_cos_std_protected"] == pytest.approx(float(y.std(correction=0)), rel=1e-6)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    assert m["impostor_cos_slope"] == pytest.approx(slope, rel=1e-6) and 0 < slope < 1
    pulled = torch.nn.functional.normalize(clean + clean.roll(2, 0), dim=1)  # toward the next person
    assert (
        impostor_accepts(clean, pulled, labels, 0.9)["impostor_cos_mean_protected"]
        > m["impostor_cos_mean_clean"]
    )
