"""The verification protocol on scores with a known answer, and the calibration file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ppfr import recognizers
from ppfr.errors import ConfigError
from ppfr.verification import best_threshold, embed, load_threshold, save_calibration, tar_at_far, verify


def test_perfectly_separable_pairs_give_accuracy_and_auc_one():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.0])
    issame = torch.tensor([True] * 4 + [False] * 4)
    folds = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    result = verify(scores, issame, folds)
    assert result["accuracy"] == 1.0 and result["accuracy_std"] == 0.0
    assert result["auc"] == 1.0
    assert result["tar_at_far_1e-2"] == 1.0
    assert result["threshold"] == pytest.approx(0.45)  # midway between the closest genuine and impostor
    assert result["protocol"].startswith("2-fold") and result["n_pairs"] == 8


def test_threshold_is_chosen_on_the_other_fold():
    # Fold 0 alone is best split at 0.5; fold 1 alone at 0.15. Each fold is tested with the other's
    # threshold: fold 0 at 0.15 calls its 0.4 impostor "same" (3/4); fold 1 at 0.5 rejects 0.45 and 0.2 (2/4).
    scores = torch.tensor([0.9, 0.6, 0.4, 0.1, 0.45, 0.2, 0.1, 0.0])
    issame = torch.tensor([True, True, False, False, True, True, False, False])
    folds = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    result = verify(scores, issame, folds)
    assert result["accuracy"] == pytest.approx(0.625)
    assert result["accuracy_std"] == pytest.approx(0.125)


def test_single_fold_falls_back_to_ten_balanced_folds():
    g = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.rand(50, generator=g) * 0.5 + 0.4, torch.rand(50, generator=g) * 0.5])
    issame = torch.tensor([True] * 50 + [False] * 50)
    result = verify(scores, issame, torch.zeros(100, dtype=torch.long))
    assert result["protocol"].startswith("10-fold over pair order")
    assert 0.5 < result["accuracy"] < 1.0 and 0.5 < result["auc"] < 1.0


def test_best_threshold_skips_ties_and_far_threshold_counts_impostors():
    threshold, acc = best_threshold(torch.tensor([0.5, 0.5, 0.9]), torch.tensor([False, True, True]))
    assert acc == pytest.approx(2 / 3) and threshold != 0.5
    impostor = torch.linspace(0.0, 0.99, 100)  # 100 impostors; FAR 1e-2 allows exactly one above threshold
    scores = torch.cat([impostor, torch.tensor([0.985, 0.5])])
    issame = torch.tensor([False] * 100 + [True, True])
    tar, thr = tar_at_far(scores, issame, 1e-2)
    assert thr == pytest.approx(0.98) and tar == 0.5
    assert int((impostor > thr).sum()) == 1


def test_calibration_round_trip_and_merge(tmp_path):
    path = tmp_path / "sub" / "calibration.json"
    result = {
        "threshold": 0.31,
        "threshold_far_1e-3": 0.42,
        "accuracy": 0.99,
        "protocol": "2-fold",
        "n_pairs": 8,
        "auc": 1,
    }
    save_calibration(path, "rec_a", "lfw", result)
    save_calibration(path, "rec_a", "celeba", {**result, "threshold": 0.2})
    save_calibration(path, "rec_b", "lfw", {**result, "threshold": 0.5})
    assert load_threshold(path, "rec_a", "lfw") == 0.31
    assert load_threshold(path, "rec_a", "celeba") == 0.2
    assert load_threshold(path, "rec_b", "lfw", key="threshold_far_1e-3") == 0.42
    assert set(json.loads(path.read_text())["rec_a"]["lfw"]) == {
        "threshold", "threshold_far_1e-3", "accuracy", "protocol", "n_pairs"
    }  # fmt: skip
    assert not list(path.parent.glob("*.tmp"))


def test_missing_calibration_names_file_and_entry(tmp_path):
    path = tmp_path / "calibration.json"
    with pytest.raises(
        ConfigError, match=r"calibration\.json: calibration file not found.*experiment=verify"
    ):
        load_threshold(path, "rec_a", "lfw")
    save_calibration(path, "rec_a", "lfw", {"threshold": 0.3, "threshold_far_1e-3": 0.4, "accuracy": 1.0,
                                           "protocol": "p", "n_pairs": 2})  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"calibration\.json: no threshold for recognizer 'rec_b' on dataset 'lfw'.*experiment=verify",
    ):
        load_threshold(path, "rec_b", "lfw")
    with pytest.raises(ConfigError, match="dataset 'celeba'"):
        load_threshold(path, "rec_a", "celeba")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the calibration file"):
        load_threshold(path, "rec_a", "lfw")


def test_embed_rows_follow_index_and_flip_sums_both_views(models_dir):
    rec = recognizers.create("mobileface_becauseofai", models_dir)
    images = torch.rand(5, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    items = [{"image": images[k], "index": k} for k in range(5)]
    loader = DataLoader(items, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain, flipped = rec(images), rec(images.flip(-1))
    assert torch.allclose(embed(rec, loader, flip=False, device="cpu"), plain, atol=1e-5)
    both = embed(rec, loader, flip=True, device="cpu")
    assert torch.allclose(both, F.normalize(plain + flipped, dim=1), atol=1e-5)
    assert not torch.allclose(both, plain, atol=1e-3)
