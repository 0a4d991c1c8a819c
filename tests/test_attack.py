"""Reconstruction attackers on tiny real data: soundness orderings, resume, identity loss, the preset.

The U-Net is kept tiny for CPU: resnet18 encoder at depth 3, decoder (32, 16, 8), trained on random
56-px crops of the 112-px faces (paired: the same crop of X' and X) and evaluated on whole faces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import datamodules
from attacks import ATTACKERS
from attacks.pairs import PairDataset, build_augment, split_identities
from ppfr import recognizers
from ppfr.config import compose, to_dict
from ppfr.errors import ConfigError
from ppfr.fit import main
from ppfr.io import save_png
from ppfr.protect import ProtectionMethod, create
from ppfr.run import Run
from ppfr.tasks.attack import attack, surrogate

ROOT = Path(__file__).resolve().parents[1]


class Identity(ProtectionMethod):
    """X' = X: the control an attacker must undo almost perfectly."""

    name = "identity"

    def forward(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        return x


def attack_args(faces_mini, lfw_train, models_dir, cache, tmp_path, *extra: str) -> list[str]:
    return [
        "experiment=attack",
        f"data.root={faces_mini / 'lfw'}",
        "data.subset.pairs=4",
        f"data.cache_dir={cache}",
        f"attack.train_data.root={lfw_train}",
        "attack.train_data.subset.identities=40",
        f"attack.train_data.cache_dir={cache}",
        "attack.pairs.count=32",
        "attack.encoder_depth=3",
        "attack.decoder_channels=[32,16,8]",
        "attack.augment.crop=56",
        "attack.batch_size=8",
        "attack.num_workers=0",
        "attack.early_stopping_patience=0",
        "trainer=cpu",
        "trainer.max_epochs=1000",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"paths.models={models_dir}",
        f"paths.outputs={tmp_path / 'outputs'}",
        f"calibration_file={tmp_path / 'none.json'}",  # thresholds from the test faces' clean pairs
        *extra,
    ]


def run_attack(args: list[str], run_dir: Path, method: ProtectionMethod, record: dict) -> dict:
    cfg = compose([*args, f"run_dir={run_dir}"])
    run = Run(cfg)
    try:
        blackbox = recognizers.create_many(list(cfg.eval.blackbox), cfg.recognizer.models_dir)
        return attack(cfg, run, method, record, {}, blackbox)
    finally:
        run.finish()


@pytest.mark.slow
def test_identity_protection_is_undone(faces_mini, lfw_train, models_dir, align_cache, tmp_path):
    """X' = X reconstructs to SSIM > 0.85 on held-out faces within 300 steps (fresh seeds, so the
    figure varies: 0.93 and 0.89 measured)."""
    args = attack_args(
        faces_mini, lfw_train, models_dir, align_cache, tmp_path, "attack.pairs.count=48",
        "attack.max_steps=300", "attack.lr=0.005", "attack.val_every_n_steps=100",
    )  # fmt: skip
    results = run_attack(args, tmp_path / "run", Identity(), {"name": "identity"})
    summary = results["attack"]["summary"]
    assert results["training"]["steps"] == 300
    assert summary["n_images"] >= 6 and summary["ssim_protected"] == pytest.approx(1.0)
    assert summary["ssim_recon"] > 0.85
    assert all(m["match_recon"] == 1.0 for m in results["attack"]["reid"].values())
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["attack"]["summary"]["ssim_recon"] == summary["ssim_recon"]
    assert (tmp_path / "run" / "attack_reid.csv").exists()
    assert (tmp_path / "run" / "images" / "attack_grid.png").exists()


@pytest.mark.slow
def test_blur_leaks_more_than_lfsa(faces_mini, lfw_train, models_dir, align_cache, tmp_path):
    """Blur (sigma 3 px) reconstructs better than LFSA at equal training (LFSA at its defaults but
    protect.steps=10 to keep it fast; 32 training pairs, 80 steps each)."""
    args = attack_args(
        faces_mini, lfw_train, models_dir, align_cache, tmp_path, "attack.max_steps=80", "attack.lr=0.005"
    )
    ssim = {}
    for option in ("blur", "lfsa"):
        results = main([*args, f"protect={option}", "protect.steps=10" if option == "lfsa" else "protect.sigma=3.0",
                        f"run_dir={tmp_path / option}"])  # fmt: skip
        assert results["training"]["steps"] == 80
        ssim[option] = results["attack"]["summary"]["ssim_recon"]
        print(option, results["attack"]["summary"])
    assert ssim["blur"] > ssim["lfsa"] + 0.1


@pytest.mark.slow
def test_killed_attacker_run_resumes(faces_mini, lfw_train, models_dir, align_cache, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        *attack_args(faces_mini, lfw_train, models_dir, align_cache, tmp_path, "protect=blur"),
        "attack.max_steps=40",
        "attack.val_every_n_steps=2",
        f"run_dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppfr.fit", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.05)
    assert proc.poll() is None, (
        f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    time.sleep(0.5)  # let the checkpoint's rename finish
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < killed_at < 40
    # the shared protected sets: training pairs, and the test set (written first)
    pairs = sorted((tmp_path / "outputs").glob("attack_*/*/**/*.png"))
    assert {p.relative_to(tmp_path / "outputs").parts[0] for p in pairs} == {"attack_pairs", "attack_test"}
    stamps = [p.stat().st_mtime_ns for p in pairs]

    results = main(args)
    assert results["training"]["resumed_from_step"] == killed_at
    assert results["training"]["steps"] == 40
    assert [p.stat().st_mtime_ns for p in pairs] == stamps  # both sets were reused, not regenerated
    # Rerun once more: nothing left to train, the same evaluation of the same checkpoint.
    again = main(args)
    assert again["training"]["resumed_from_step"] == 40 and again["training"]["steps"] == 40
    assert again["attack"]["summary"]["psnr_recon"] == pytest.approx(
        results["attack"]["summary"]["psnr_recon"], abs=0.01
    )


def test_identity_loss_changes_the_gradient(faces_mini, models_dir, align_cache):
    dm = datamodules.create(
        {
            "name": "lfw",
            "root": str(faces_mini / "lfw"),
            "subset": {"pairs": 2},
            "cache_dir": str(align_cache),
        }
    )
    x = torch.stack([dm.dataset[i]["image"] for i in range(2)])
    xp = create({"name": "blur", "sigma": 3.0})(x, torch.zeros(2, dtype=torch.long))
    cfg = to_dict(
        compose(["experiment=attack", "attack.encoder_depth=3", "attack.decoder_channels=[32,16,8]"]).attack
    )
    f = recognizers.create("mobilefacenet_tf", models_dir)

    def grads(weight: float, state=None):
        node = {**cfg, "identity_loss": {"weight": weight, "recognizer": None}}
        module = ATTACKERS.create("unet", node, in_channels=3, surrogate=f if weight else None)
        if state is not None:
            module.load_state_dict(state)
        loss, parts = module.loss(module(xp), x)
        loss.backward()
        return (
            module,
            parts,
            torch.cat([p.grad.flatten() for p in module.net.parameters() if p.requires_grad]),
        )

    plain, parts0, g0 = grads(0.0)
    _, parts1, g1 = grads(1.0, plain.state_dict())
    _, _, g0_again = grads(0.0, plain.state_dict())
    assert "identity_cos" not in parts0 and -1 <= float(parts1["identity_cos"]) <= 1
    assert torch.allclose(g0, g0_again)  # same weights, same batch: the plain gradient is reproducible
    assert (g1 - g0).norm() > 1e-3 * g0.norm()
    assert all(p.grad is None for p in f.parameters())  # the surrogate stays frozen


def test_identity_loss_refuses_black_boxes_and_their_siblings(models_dir):
    base = ["experiment=attack", f"paths.models={models_dir}", "attack.identity_loss.weight=1"]
    blackbox = recognizers.create_many(["dlib_resnet", "hse_faceres"], models_dir)
    default = surrogate(compose(base), blackbox)
    assert default.name == compose(base).protect.ensemble[0]
    with pytest.raises(ConfigError, match="is a black box of eval.blackbox"):
        surrogate(compose([*base, "attack.identity_loss.recognizer=dlib_resnet"]), blackbox)
    with pytest.raises(ConfigError, match="siblings"):
        surrogate(compose([*base, "attack.identity_loss.recognizer=hse_faceres_deep"]), blackbox)
    with pytest.raises(ConfigError, match="no ensemble"):
        surrogate(compose([*base, "protect=blur"]), blackbox)
    assert surrogate(compose(base[:-1]), blackbox) is None  # weight 0: no surrogate at all


def test_training_identities_must_be_disjoint_from_the_test_set(faces_mini, lfw_train, align_cache):
    def lfw(root: Path, **subset) -> datamodules.FaceDataModule:
        return datamodules.create(
            {"name": "lfw", "root": str(root), "pairs_file": None, "subset": subset,
             "cache_dir": str(align_cache), "on_no_face": "center_crop"}
        )  # fmt: skip

    test = lfw(faces_mini / "lfw", identities=3)
    key = ("attack.train_data", "an attacker must be trained on other people")
    with pytest.raises(ConfigError, match="shares 3 identities"):
        datamodules.check_disjoint_identities(lfw(faces_mini / "lfw", identities=5), test, *key)
    datamodules.check_disjoint_identities(lfw(lfw_train, identities=3), test, *key)


def test_paired_augmentation_moves_x_prime_and_x_together(faces_mini, align_cache, tmp_path):
    dm = datamodules.create(
        {
            "name": "lfw",
            "root": str(faces_mini / "lfw"),
            "subset": {"pairs": 2},
            "cache_dir": str(align_cache),
        }
    )
    files = []
    for i in range(len(dm.dataset)):  # X' = X on disk: after augmentation both must still agree
        files.append(str(tmp_path / f"{i}.png"))
        save_png(dm.dataset[i]["image"], Path(files[-1]))
    data = PairDataset(dm.dataset, range(len(files)), files, build_augment({"hflip": 0.5, "crop": 56}))
    for k in range(len(data)):
        item = data[k]
        assert item["input"].shape == item["target"].shape == (3, 56, 56)
        assert torch.allclose(item["input"], item["target"], atol=1 / 255 + 1e-6)
    with pytest.raises(ConfigError, match="attack.augment: unknown"):
        build_augment({"rotate": 10})


def test_validation_identities_are_stable_and_never_all():
    names = [f"person_{i}" for i in range(200)]
    val = split_identities(names, 0.1)
    assert 5 <= len(val) <= 40 and val <= set(names)
    assert split_identities(names[:100], 0.1) == val & set(names[:100])  # growing the data moves no one
    assert split_identities(["a", "a"], 0.5) == set() and len(split_identities(["a", "b"], 0.99)) == 1
    assert split_identities(names, 0.0) == set()


@pytest.mark.slow
def test_attack_all_runs_one_step_per_method(faces_mini, lfw_train, models_dir, align_cache, tmp_path):
    args = attack_args(faces_mini, lfw_train, models_dir, align_cache, tmp_path)
    args = [
        "experiment=attack_all", *args[1:], "data.subset.pairs=2", "attack.pairs.count=4",
        "attack.max_steps=1", "attack.augment.crop=null", "protect.steps=1", f"run_dir={tmp_path / 'all'}",
    ]  # fmt: skip
    results = main(args)
    methods = compose(["experiment=attack_all"]).attack.methods
    assert list(results["methods"]) == list(methods)
    for option in methods:
        sub = json.loads((tmp_path / "all" / option / "results.json").read_text())
        assert sub["training"]["steps"] == 1, option
        assert sub["method"]["name"] == compose([f"protect={option}"]).protect.name
        assert 0 <= sub["attack"]["summary"]["ssim_recon"] <= 1
        if "steps" in sub["method"]:
            assert sub["method"]["steps"] == 1  # protect.* overrides reach every method that has the key
    assert (tmp_path / "all" / "attack_methods.csv").exists()
