"""Generating protected sets: one process vs DDP, kill and resume, refused resumes, presets, grid stages,
the convergence curve, evaluation in the same run; the run's status and file modes."""

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

from ppfr.config import compose
from ppfr.errors import DataError
from ppfr.fit import main
from ppfr.generate import ProtectedSet, item_seeds, safe_name
from ppfr.io import load_png, save_png, write_atomic
from ppfr.run import Run

ROOT = Path(__file__).resolve().parents[1]


def protect_args(faces_mini: Path, models_dir: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=protect",
        "data=lfw",
        f"data.root={faces_mini / 'lfw'}",
        "data.subset.pairs=4",
        f"data.cache_dir={cache}",
        f"paths.models={models_dir}",
        "protect.steps=2",
        "generate.batch_size=2",
        "trainer=cpu",
        "logger=csv",
        f"run_dir={run_dir}",
        *extra,
    ]


def pngs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "shards").rglob("*.png"))


def umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_item_seeds_fresh_or_derived():
    ids = ["a/a_0001.jpg", "b/b_0001.jpg"]
    assert not torch.equal(item_seeds(ids, None), item_seeds(ids, None))
    assert torch.equal(item_seeds(ids, 3), item_seeds(ids, 3))
    assert torch.equal(item_seeds(ids[1:], 3), item_seeds(ids, 3)[1:])  # independent of batch composition
    assert (item_seeds(ids, None) >= 0).all()


@pytest.mark.slow
def test_protect_writes_set_and_evaluates(faces_mini, models_dir, align_cache, tmp_path):
    results = main(
        protect_args(faces_mini, models_dir, align_cache, tmp_path / "run", "seed=0", "eval.grid=2")
    )
    out = Path(results["generation"]["out_dir"])
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == results["generation"]["images"] > 0
    assert len(pngs(out)) == len(manifest)
    for rec in manifest:
        image = load_png(out / rec["path"])
        assert image.shape == (3, 112, 112)
    summary = results["eval"]["summary"]
    assert 0.0 < summary["ssim"] < 0.9 and summary["psnr"] > 0
    assert set(results["eval"]["blackbox"]) == {"dlib_resnet", "hse_faceres"}
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["seed"] == 0 and saved["eval"]["summary"]["ssim"] == summary["ssim"]
    assert saved["status"] == "ok"
    assert (tmp_path / "run" / "images" / "eval_grid.png").exists()
    # The grid stages were stored while generating, for the first eval.grid images in dataset order.
    for rec in manifest[:2]:
        for stage in ("F", "C"):
            assert load_png(out / "grid" / f"{safe_name(rec['id'])}.{stage}.png").shape == (3, 112, 112)
    assert len(list((out / "grid").glob("*.png"))) == 4
    # The convergence curve: one row per step, averaged over the images.
    curve = (tmp_path / "run" / "convergence.csv").read_text().splitlines()
    assert curve[0].startswith("step,loss,cos,entropy") and len(curve) == 1 + 2
    # Run files have the umask's mode, like the PNGs (mkstemp alone gives 0600).
    for path in (
        "results.json",
        "config.yaml",
        "convergence.csv",
        "protected/meta.json",
        "protected/manifest.jsonl",
    ):
        assert (tmp_path / "run" / path).stat().st_mode & 0o777 == umask_mode(), path
    assert (out / manifest[0]["path"]).stat().st_mode & 0o777 == umask_mode()
    # The same command again finds every image finished and generates nothing.
    again = main(
        protect_args(faces_mini, models_dir, align_cache, tmp_path / "run", "seed=0", "eval.enabled=false")
    )
    assert again["generation"]["generated_now"] == 0
    assert again["seed"] == again["generation"]["seed"] == 0
    # experiment=evaluate measures the written set alone, with the same numbers.
    args = protect_args(
        faces_mini, models_dir, align_cache, tmp_path / "eval", f"eval.set_dir={out}", "eval.grid=2"
    )
    evaluated = main(["experiment=evaluate", *args[1:]])
    assert evaluated["eval"]["summary"]["ssim"] == pytest.approx(summary["ssim"], abs=1e-6)
    assert (
        evaluated["eval"]["blackbox"]["dlib_resnet"]["match"]
        == results["eval"]["blackbox"]["dlib_resnet"]["match"]
    )


@pytest.mark.slow
def test_ddp_spawn_writes_the_same_files_as_one_process(faces_mini, models_dir, align_cache, tmp_path):
    one = main(
        protect_args(faces_mini, models_dir, align_cache, tmp_path / "one", "seed=1", "eval.enabled=false")
    )
    two = main(
        protect_args(
            faces_mini,
            models_dir,
            align_cache,
            tmp_path / "two",
            "seed=1",
            "eval.enabled=false",
            "trainer.devices=2",
            "trainer.strategy=ddp_spawn",
        )
    )
    out1, out2 = Path(one["generation"]["out_dir"]), Path(two["generation"]["out_dir"])
    assert pngs(out1) == pngs(out2) and len(pngs(out1)) == one["generation"]["images"]
    m1 = {r["id"]: r for r in map(json.loads, (out1 / "manifest.jsonl").read_text().splitlines())}
    m2 = {r["id"]: r for r in map(json.loads, (out2 / "manifest.jsonl").read_text().splitlines())}
    assert m1.keys() == m2.keys()
    assert all(m1[k]["seed"] == m2[k]["seed"] for k in m1)  # per-image seeds: same set, whatever the split
    curves = [(tmp_path / run / "convergence.csv").read_text().splitlines() for run in ("one", "two")]
    assert len(curves[0]) == len(curves[1]) == 1 + 2  # gathered from both processes
    for k in m1:
        diff = (load_png(out1 / m1[k]["path"]) - load_png(out2 / m2[k]["path"])).abs().max()
        assert diff <= 2 / 255


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_run_resumes_without_loss_or_duplicates(stop, faces_mini, models_dir, align_cache, tmp_path):
    """A crash (SIGKILL) and a preemption (SIGTERM, which must end the run at a finished batch)."""
    run_dir = tmp_path / "run"
    args = protect_args(
        faces_mini,
        models_dir,
        align_cache,
        run_dir,
        "eval.enabled=false",
        "generate.batch_size=1",
        "data.subset.identities=6",
        "protect.steps=3",
    )
    cmd = [sys.executable, "-m", "ppfr.fit", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    protected = ProtectedSet(run_dir / "protected")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(protected.records()) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, (
        f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    )
    proc.send_signal(stop)
    code = proc.wait(timeout=120)
    if stop == signal.SIGTERM:
        assert code == 1 and "stopped by SIGTERM after a finished batch" in proc.stderr.read().decode()
    done_before = len(protected.records())
    assert done_before >= 2 and not (run_dir / "protected" / "manifest.jsonl").exists()

    results = main(args)
    gen = results["generation"]
    assert gen["resumed_from"] == done_before
    assert gen["generated_now"] + gen["resumed_from"] == gen["images"]
    manifest = [
        json.loads(line) for line in (run_dir / "protected" / "manifest.jsonl").read_text().splitlines()
    ]
    ids = [r["id"] for r in manifest]
    assert len(ids) == len(set(ids)) == gen["images"]
    assert len(pngs(run_dir / "protected")) == gen["images"]  # no stray or duplicated files
    assert not list((run_dir / "protected").rglob("*.tmp"))


@pytest.mark.slow
def test_a_set_refuses_a_rerun_that_would_change_its_images(faces_mini, models_dir, align_cache, tmp_path):
    """Another subset, seed policy or method config than the set was written with: a DataError naming
    what differs, and the set is left as it was."""
    run_dir = tmp_path / "run"
    args = protect_args(
        faces_mini, models_dir, align_cache, run_dir, "eval.enabled=false", "data.subset.pairs=2"
    )
    first = main([*args, "protect.steps=1"])
    manifest = (run_dir / "protected" / "manifest.jsonl").read_text()
    refused = [
        ("data.subset.pairs=3", r"data ids .*the set holds 4 images, this run \d+"),
        ("seed=1", r"seed policy \(seed\): the set has null \(fresh OS entropy\), this run 1"),
        ("protect.steps=2", "protect.steps: 1 in the set, 2 here"),
    ]
    for extra, message in refused:
        with pytest.raises(DataError, match=message):
            main([*args, "protect.steps=1", extra])
    assert (run_dir / "protected" / "manifest.jsonl").read_text() == manifest
    assert len(pngs(run_dir / "protected")) == first["generation"]["images"]


def test_bind_names_each_part_that_differs(tmp_path):
    """The ensemble's weights (sha256) are part of what a set was written with; a set from an older
    ppfr, which did not record them, is refused too."""
    ids = ["a/a_0001.jpg", "b/b_0001.jpg"]
    protected = ProtectedSet(tmp_path / "set")
    digest = protected.bind({"name": "blur", "sigma": 3.0}, 0, ids, {"m": "aa"})
    assert protected.bind({"name": "blur", "sigma": 3.0}, 0, ids, {"m": "aa"}) == digest
    with pytest.raises(DataError, match=r"ensemble models .*'m': 'aa'.*'m': 'bb'"):
        protected.bind({"name": "blur", "sigma": 3.0}, 0, ids, {"m": "bb"})
    with pytest.raises(DataError, match="data ids") as err:
        protected.bind({"name": "blur", "sigma": 3.0}, 0, ids[::-1], {"m": "aa"})
    assert "seed" not in str(err.value) and "method" not in str(err.value)
    write_atomic(protected.dir / "meta.json", json.dumps({"config_hash": "old", "method": {}}))
    with pytest.raises(DataError, match="not recorded by the set"):
        protected.bind({"name": "blur", "sigma": 3.0}, 0, ids, {"m": "aa"})


def test_run_records_how_it_ended(tmp_path):
    cfg = compose(["experiment=data_check", f"run_dir={tmp_path}", "logger=csv"])
    with pytest.raises(DataError), Run(cfg):
        raise DataError("the data is wrong")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "failed"
    assert saved["error"] == {"type": "DataError", "message": "the data is wrong"}
    with Run(compose(["experiment=data_check", f"run_dir={tmp_path}", "logger=csv"])) as run:
        assert json.loads(run.results_path.read_text())["status"] == "running"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "ok" and "error" not in saved


def test_io_writes_atomically_with_the_umask_mode(tmp_path):
    image = torch.rand(3, 8, 8)
    save_png(image, tmp_path / "a" / "x.png")
    write_atomic(tmp_path / "a" / "t.txt", "text\n")
    assert (load_png(tmp_path / "a" / "x.png") - image).abs().max() <= 0.5 / 255 + 1e-6
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["t.txt", "x.png"]  # no temp files left
    for name in ("x.png", "t.txt"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == umask_mode()
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        load_png(tmp_path / "bad.png")


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset",
    [
        "protect=paper",
        "protect=wo_f",
        "protect=wo_c",
        "protect=wo_p",
        "experiment=ensemble_1",
        "experiment=ensemble_2",
        "experiment=ensemble_3",
        "experiment=ensemble_4",
    ],
)
def test_presets_run(preset, faces_mini, models_dir, align_cache, tmp_path):
    args = protect_args(
        faces_mini,
        models_dir,
        align_cache,
        tmp_path / "run",
        "eval.enabled=false",
        "data.subset.pairs=2",
        "protect.steps=1",
    )
    results = main([*args, preset] if preset.startswith("protect") else [preset, *args[1:]])
    assert results["generation"]["images"] >= 1


@pytest.mark.slow
def test_fresh_randomness_gives_different_images_that_both_still_match(
    faces_mini, models_dir, align_cache, tmp_path
):
    """seed=null: the same faces protected twice differ, and a calibrated black box matches both."""
    calibration = tmp_path / "calibration.json"
    main(
        [
            "experiment=verify", "recognizer=dlib_resnet", "data=lfw", f"data.root={faces_mini / 'lfw'}",
            "data.subset.pairs=100", f"data.cache_dir={align_cache}", f"paths.models={models_dir}",
            f"calibration_file={calibration}", "logger=csv", f"run_dir={tmp_path / 'verify'}",
        ]
    )  # fmt: skip
    runs = []
    for k in range(2):
        args = protect_args(faces_mini, models_dir, align_cache, tmp_path / f"run{k}", "data.subset.pairs=2")
        extra = ["protect.steps=30", "eval.blackbox=[dlib_resnet]", "eval.threshold_source=nearest",
                 f"calibration_file={calibration}", "eval.grid=0"]  # fmt: skip
        runs.append(main([*args, *extra]))
    assert runs[0]["seed"] is None and runs[0]["seed_source"] == "os-entropy"
    sets = [Path(r["generation"]["out_dir"]) for r in runs]
    assert pngs(sets[0]) == pngs(sets[1])
    for name in pngs(sets[0]):
        assert (load_png(sets[0] / name) - load_png(sets[1] / name)).abs().mean() > 0.02
    for r in runs:
        dlib = r["eval"]["blackbox"]["dlib_resnet"]
        assert dlib["threshold_source"].startswith("file")  # calibrated on 100 pairs, the nearest entry
        assert dlib["match"] == 1.0, dlib
