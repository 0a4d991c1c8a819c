"""The verification protocol on scores with a known answer, and the calibration file."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ppfr import recognizers
from ppfr.errors import ConfigError, DataError
from ppfr.fit import main
from ppfr.verification import best_threshold, embed, find_calibration, save_calibration, tar_at_far, verify


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


FULL = {"dataset": "lfw", "root": "/data/lfw", "pairs_file": "pairs.txt", "subset": {}, "flip": True,
        "recognizer": "rec_a", "sha256": "ab" * 32}  # fmt: skip
RESULT = {"threshold": 0.31, "threshold_far_1e-2": 0.4, "threshold_far_1e-3": 0.42, "accuracy": 0.99,
          "protocol": "2-fold", "n_pairs": 8, "auc": 1.0}  # fmt: skip


def test_calibration_entries_are_keyed_by_what_they_were_measured_on(tmp_path):
    path = tmp_path / "sub" / "calibration.json"
    subset = {**FULL, "subset": {"pairs": 100}}
    save_calibration(path, FULL, RESULT)
    save_calibration(path, subset, {**RESULT, "threshold": 0.9})  # a quick run on 100 pairs
    save_calibration(path, {**FULL, "recognizer": "rec_b"}, {**RESULT, "threshold": 0.5})
    assert find_calibration(path, FULL)["threshold"] == 0.31  # not replaced by the subset run
    assert find_calibration(path, subset)["threshold"] == 0.9
    assert find_calibration(path, FULL)["threshold_far_1e-2"] == 0.4
    save_calibration(path, FULL, {**RESULT, "threshold": 0.33})  # the same key is replaced
    stored = json.loads(path.read_text())["entries"]
    assert len(stored) == 3 and find_calibration(path, FULL)["threshold"] == 0.33
    assert set(stored[-1]) == {"measured_on", "threshold", "threshold_far_1e-2", "threshold_far_1e-3",
                               "accuracy", "protocol", "n_pairs"}  # fmt: skip
    assert not list(path.parent.glob("*.tmp"))


def test_lookup_with_another_flip_or_subset_is_refused_naming_the_difference(tmp_path):
    path = tmp_path / "calibration.json"
    save_calibration(path, FULL, RESULT)
    with pytest.raises(ConfigError, match=r"nearest differs in flip: calibrated True, here False\."):
        find_calibration(path, {**FULL, "flip": False})
    with pytest.raises(ConfigError, match=r"subset: calibrated all, here pairs=2.*experiment=verify"):
        find_calibration(path, {**FULL, "subset": {"pairs": 2}})
    with pytest.raises(ConfigError, match=r"sha256: calibrated abababababab, here cdcdcdcdcdcd"):
        find_calibration(path, {**FULL, "sha256": "cd" * 32})
    with pytest.warns(UserWarning, match=r"root: calibrated /data/lfw, here /other.*using it anyway"):
        entry = find_calibration(path, {**FULL, "root": "/other", "flip": False}, fallback=True)
    assert entry["threshold"] == 0.31 and entry["measured_on"]["flip"] is True
    assert entry["differs"] == [
        "root: calibrated /data/lfw, here /other",
        "flip: calibrated True, here False",
    ]


def test_missing_or_old_calibration_names_file_and_entry(tmp_path):
    path = tmp_path / "calibration.json"
    with pytest.raises(
        ConfigError, match=r"calibration\.json: calibration file not found.*experiment=verify"
    ):
        find_calibration(path, FULL)
    save_calibration(path, FULL, RESULT)
    with pytest.raises(
        ConfigError, match=r"calibration\.json: no threshold for recognizer 'rec_b'.*experiment=verify"
    ):
        find_calibration(path, {**FULL, "recognizer": "rec_b"})
    path.write_text(json.dumps({"rec_a": {"lfw": RESULT}}))
    with pytest.raises(
        ConfigError, match=r"older ppfr \(thresholds keyed by dataset name alone\); delete it"
    ):
        find_calibration(path, FULL)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read the calibration file"):
        find_calibration(path, FULL)


def test_too_few_pairs_for_folds():
    one_each = verify(torch.tensor([0.8, 0.2]), torch.tensor([True, False]), torch.zeros(2, dtype=torch.long))
    assert one_each["accuracy"] == 1.0 and math.isnan(one_each["accuracy_std"])
    assert one_each["protocol"].startswith("no cross-validation (1 genuine, 1 impostor pairs)")
    assert 0.2 < one_each["threshold"] < 0.8
    # The pairs file's folds when each leaves both kinds to train on; else balanced folds.
    scores, issame = torch.tensor([0.9, 0.7, 0.6, 0.1, 0.2]), torch.tensor([True, True, True, False, False])
    result = verify(scores, issame, torch.tensor([0, 0, 1, 0, 1]))
    assert result["protocol"] == "2-fold (folds of the pairs file)"
    result = verify(scores, issame, torch.tensor([0, 0, 1, 0, 0]))
    assert result["protocol"] == "2-fold over pair order (a fold of the pairs file leaves one kind)"
    assert result["accuracy"] == 1.0
    with pytest.raises(DataError, match="needs genuine and impostor pairs; got 1 genuine and 0 impostor"):
        verify(torch.tensor([0.5]), torch.tensor([True]), torch.zeros(1, dtype=torch.long))


def verify_cli(faces_mini, models_dir, align_cache, tmp_path, pairs, *extra):
    return main(
        [
            "experiment=verify", "recognizer=dlib_resnet", "logger=csv", f"data.root={faces_mini / 'lfw'}",
            f"data.cache_dir={align_cache}", f"paths.models={models_dir}", f"data.subset.pairs={pairs}",
            f"calibration_file={tmp_path / 'calibration.json'}", f"run_dir={tmp_path / f'run{pairs}'}", *extra,
        ]
    )  # fmt: skip


@pytest.mark.slow
def test_verify_on_two_pairs_and_one_pair(faces_mini, models_dir, align_cache, tmp_path, capsys):
    results = verify_cli(faces_mini, models_dir, align_cache, tmp_path, 2)
    assert results["dlib_resnet"]["n_pairs"] == 2 and results["dlib_resnet"]["accuracy"] == 1.0
    assert "no cross-validation" in results["dlib_resnet"]["protocol"]
    out = capsys.readouterr().out
    assert "thr@FAR1e-2" in out and "thr@FAR1e-3" in out
    verify_cli(faces_mini, models_dir, align_cache, tmp_path, 4, "recognizer.flip=false")
    entries = json.loads((tmp_path / "calibration.json").read_text())["entries"]
    keys = [(e["measured_on"]["subset"], e["measured_on"]["flip"]) for e in entries]
    assert keys == [({"pairs": 2}, True), ({"pairs": 4}, False)]  # the second run kept the first's
    assert entries[0]["measured_on"]["root"] == str((faces_mini / "lfw").resolve())
    with pytest.raises(ConfigError, match=r"data\.subset\.pairs=1\): 1 genuine and 0 impostor pairs"):
        verify_cli(faces_mini, models_dir, align_cache, tmp_path, 1)


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
