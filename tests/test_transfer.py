"""Transfer boosters and experiment=transfer, on real aligned faces and real recognizers (CPU, few steps)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import first_faces
from torchmetrics.functional.image import structural_similarity_index_measure

from ppfr import recognizers
from ppfr.config import compose
from ppfr.errors import ConfigError
from ppfr.fit import main
from ppfr.generate import build_method, reference_embeddings
from ppfr.protect import parts
from ppfr.protect.lfsa import LFSA, ssim, whitening
from ppfr.tasks.transfer import wilson

SURROGATES = ["mobilefacenet_relu6", "faceplugin_mobilefacenet"]
SEEDS = torch.tensor([21, 22])

# Each booster on, and the same booster off with its other keys changed: off must change nothing.
BOOSTERS = {
    "feature_dropout": ({"rate": 0.05, "layers": [0.3, 0.7]}, {"rate": 0.0, "layers": [0.1, 0.9]}),
    "views": ({"k": 2, "rotate": 10.0, "resample": 0.5}, {"k": 0, "rotate": 30.0, "resample": 0.3}),
    "variance_tuning": ({"n": 2, "radius": 0.05}, {"n": 0, "radius": 0.2}),
    "margin": (
        {"enabled": True, "temperature": 0.05, "stop_margin": 0.0},
        {"enabled": False, "temperature": 1.0, "stop_margin": 0.5},
    ),
    "lowres": ({"size": 28, "weight": 1.0}, {"size": 0, "weight": 3.0}),
    "ti_kernel": (9, 0),
    "linear_backward": ({"enabled": True, "start": 0.5}, {"enabled": False, "start": 0.0}),
    "negatives": ({"weight": 1.0, "temperature": 0.05}, {"weight": 0.0, "temperature": 0.5}),
    "whiten": ({"strength": 0.5}, {"strength": 0.0}),
}


@pytest.fixture(scope="module")
def faces(faces_mini, align_cache) -> torch.Tensor:
    """Two real aligned LFW faces of different people."""
    return first_faces(faces_mini, align_cache, 2)


@pytest.fixture(scope="module")
def zoo(models_dir) -> dict[str, recognizers.Recognizer]:
    names = [*SURROGATES, "mobilefacenet_tf"]
    return {r.name: r for r in recognizers.create_many(names, models_dir)}


@pytest.fixture(scope="module")
def references(zoo, lfw_train, align_cache) -> list[torch.Tensor]:
    """The surrogates' embeddings of four real faces of other people (lfw-train), for the negatives booster."""
    faces = first_faces(lfw_train.parent, align_cache, 4, subset=lfw_train.name)
    with torch.no_grad():
        return [zoo[n](faces) for n in SURROGATES]


def protect(zoo, faces, boosters=None, steps=2, **kwargs) -> torch.Tensor:
    """Two steps from the same seeds: the second update follows the gradient the booster changed."""
    method = LFSA(
        [zoo[n] for n in SURROGATES], steps=steps, boosters=boosters, thresholds=[0.3, 0.3], **kwargs
    )
    return method(faces, SEEDS)


@pytest.fixture(scope="module")
def plain(zoo, faces) -> torch.Tensor:
    return protect(zoo, faces)


@pytest.mark.parametrize("booster", list(BOOSTERS))
def test_booster_changes_the_ascent_only_when_on(booster, zoo, faces, plain, references):
    on, off = BOOSTERS[booster]
    refs = {booster: references} if booster in ("negatives", "whiten") else {}
    # A booster draws from its own generator stream, so the method's other draws (fill, Perlin
    # noise) stay the same: any change comes from the update direction.
    torch.testing.assert_close(protect(zoo, faces, {booster: off}, **refs), plain, atol=0, rtol=0)
    boosted = protect(zoo, faces, {booster: on}, **refs)
    assert boosted.shape == plain.shape and boosted.min() >= 0 and boosted.max() <= 1
    assert (boosted - plain).abs().mean() > 1e-4, booster


def test_mirrored_views_change_the_ascent(zoo, faces):
    """views.mirror flips every second view: the same draws, another update direction."""
    views = {"k": 2, "scale": 0.0, "shift": 0.0}
    straight = protect(zoo, faces, {"views": views})
    mirrored = protect(zoo, faces, {"views": {**views, "mirror": True}})
    assert (mirrored - straight).abs().mean() > 1e-4


def test_feature_dropout_leaves_the_surrogates_as_they_were(zoo, faces):
    before = zoo[SURROGATES[0]](faces)
    protect(zoo, faces, {"feature_dropout": {"rate": 0.1, "layers": [0.0, 0.5, 1.0]}})
    assert not any(m._forward_hooks for r in zoo.values() for m in r.modules())
    torch.testing.assert_close(zoo[SURROGATES[0]](faces), before)


def test_linear_backward_keeps_the_output_and_changes_only_the_gradient(zoo, faces):
    """LinBP: the embedding is exactly the network's, the input gradient is not; the hooks go after."""
    f = zoo[SURROGATES[0]]
    layers = parts.activations(f, 0.5)
    assert 0 < len(layers) < len(parts.activations(f, 0.0))

    def embedding_and_gradient() -> tuple[torch.Tensor, torch.Tensor]:
        x = faces.clone().requires_grad_(True)
        e = f(x)
        return e.detach(), torch.autograd.grad(e.square().sum(), x)[0]

    plain_e, plain_g = embedding_and_gradient()
    with parts.linear_backward(layers):
        linear_e, linear_g = embedding_and_gradient()
    torch.testing.assert_close(linear_e, plain_e, atol=1e-5, rtol=0)
    assert torch.nn.functional.cosine_similarity(linear_g.flatten(), plain_g.flatten(), dim=0) < 0.99
    assert not any(m._forward_hooks for m in f.modules())
    torch.testing.assert_close(embedding_and_gradient()[1], plain_g)


def test_stop_ssim_stops_each_image_at_its_budget(zoo, faces):
    surrogates = [zoo[n] for n in SURROGATES]
    start = LFSA(surrogates, steps=0)(faces, SEEDS)
    plain = LFSA(surrogates, steps=6)(faces, SEEDS)
    # X0 is already within a loose budget: nothing moves. A budget no image reaches changes nothing.
    torch.testing.assert_close(LFSA(surrogates, steps=6, stop_ssim=0.99)(faces, SEEDS), start, atol=0, rtol=0)
    lowres = LFSA(surrogates, steps=6, stop_ssim=0.99, boosters={"lowres": {"size": 28}})  # z stops too
    torch.testing.assert_close(lowres(faces, SEEDS), start, atol=0, rtol=0)
    torch.testing.assert_close(LFSA(surrogates, steps=6, stop_ssim=1e-6)(faces, SEEDS), plain, atol=0, rtol=0)
    budget = (ssim(start, faces).min() + ssim(plain, faces).max()).item() / 2
    method = LFSA(surrogates, steps=6, stop_ssim=budget)
    rows = []
    hook = surrogates[0].register_forward_hook(lambda m, i, out: rows.append(len(out)))
    try:
        stopped = method(faces, SEEDS)
    finally:
        hook.remove()
    assert (ssim(stopped, faces) <= budget).all()
    # Image i is X_s of the plain ascent at the first step s_i where it is within the budget, and
    # it leaves the batch there: the surrogates see it at steps 0 .. s_i only.
    ascent = [start, *(LFSA(surrogates, steps=s)(faces, SEEDS) for s in range(1, 6)), plain]
    within = torch.stack([ssim(a, faces) <= budget for a in ascent])  # step x image
    first = [int(col.nonzero()[0]) if col.any() else 6 for col in within.T]
    assert min(first) < 5, first  # one image stops early, so the batch shrinks
    torch.testing.assert_close(
        stopped, torch.stack([ascent[s][i] for i, s in enumerate(first)]), atol=1e-5, rtol=0
    )
    moving = [sum(s >= t for s in first) for t in range(6)]
    assert rows == [len(faces), *moving]  # the targets, then each step's moving images
    assert method.last_history["moving"] == [m / len(faces) for m in moving]
    # The budget is the evaluation's SSIM (torchmetrics), computed faster.
    expected = structural_similarity_index_measure(plain, faces, data_range=1.0, reduction="none")
    torch.testing.assert_close(ssim(plain, faces), expected, atol=1e-5, rtol=0)
    assert (stopped - start).abs().mean() > 1e-3 and (stopped - plain).abs().mean() > 1e-4


def test_negatives_push_faces_away_from_the_reference_faces(zoo, faces, references):
    """With a strong weight the ascent lowers each face's nearest cos to the reference faces, in
    every surrogate, below the plain ascent's; without reference embeddings it is refused."""

    def nearest(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(
                [
                    (F.normalize(zoo[n](images)) @ F.normalize(r).T).amax(1)
                    for n, r in zip(SURROGATES, references, strict=True)
                ]
            )

    plain = protect(zoo, faces, steps=5)
    pushed = protect(zoo, faces, {"negatives": {"weight": 5.0}}, steps=5, negatives=references)
    assert (nearest(pushed) < nearest(plain)).all(), (nearest(pushed), nearest(plain))
    with pytest.raises(ConfigError, match="boosters.negatives: needs the surrogates' embeddings"):
        protect(zoo, faces, {"negatives": {"weight": 1.0}})


def test_spread_penalty_narrows_the_scores_against_reference_faces(zoo, faces, references):
    """penalty=spread: where the plain ascent leaves a face's mean squared cos to the reference faces
    above the clean face's, a strong weight brings it lower; an unknown penalty is refused."""

    def spread(images: torch.Tensor) -> torch.Tensor:  # surrogates x faces
        with torch.no_grad():
            return torch.stack(
                [
                    (F.normalize(zoo[n](images)) @ F.normalize(r).T).square().mean(1)
                    for n, r in zip(SURROGATES, references, strict=True)
                ]
            )

    def pushed(penalty: str) -> torch.Tensor:
        booster = {"negatives": {"weight": 5.0, "penalty": penalty}}
        return protect(zoo, faces, booster, steps=5, negatives=references)

    plain, narrowed = spread(protect(zoo, faces, steps=5)), pushed("spread")
    wider = plain > spread(faces)
    assert wider.any(), (plain, spread(faces))
    assert (spread(narrowed)[wider] < plain[wider]).all(), (spread(narrowed), plain, spread(faces))
    assert (narrowed - pushed("nearest")).abs().mean() > 1e-4  # another penalty, another ascent
    with pytest.raises(ConfigError, match="negatives.penalty: 'widest' is not one of nearest, spread"):
        protect(zoo, faces, {"negatives": {"weight": 1.0, "penalty": "widest"}}, negatives=references)


def test_whiten_weights_the_directions_other_people_share_least(zoo, faces, references):
    """At strength 1 the reference faces' covariance becomes the identity (every direction among
    them weighs the same); at 0 the transform is plain cos. Without references, or with the margin
    booster (whose thresholds are plain cos), it is refused."""
    ref = F.normalize(torch.cat(references[:1] * 3) + 0.05 * torch.randn(12, references[0].shape[1]), dim=1)
    mean, matrix = whitening(ref, 1.0)
    cov = torch.cov(((ref - mean) @ matrix).T.double(), correction=0)
    top = torch.linalg.eigvalsh(cov)[-11:]  # 12 faces span 11 centred directions
    torch.testing.assert_close(top, torch.full_like(top, top.mean().item()), rtol=1e-3, atol=0)
    mean, matrix = whitening(ref, 0.0)
    assert mean.abs().max() == 0
    torch.testing.assert_close(matrix, torch.eye(len(matrix)), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="boosters.whiten: needs the surrogates' embeddings"):
        protect(zoo, faces, {"whiten": {"strength": 0.5}})
    with pytest.raises(ConfigError, match="whiten and boosters.margin"):
        protect(zoo, faces, {"whiten": {"strength": 0.5}, "margin": {"enabled": True}}, whiten=references)


def test_reference_faces_are_other_people(faces_mini, lfw_train, models_dir, align_cache):
    """The task embeds the reference people with every surrogate; people of the protected set are refused."""
    args = [
        "experiment=protect",
        f"data.root={faces_mini / 'lfw'}",
        "data.subset.pairs=4",
        f"data.cache_dir={align_cache}",
        f"paths.models={models_dir}",
        f"protect.ensemble=[{','.join(SURROGATES)}]",
    ]
    negatives = {"weight": 1.0, "root": str(lfw_train), "identities": 2}
    ensemble = recognizers.create_many(SURROGATES, models_dir)
    refs = reference_embeddings(compose(args), negatives, ensemble)
    assert [r.shape[1] for r in refs] == [f(torch.zeros(1, 3, 112, 112)).shape[1] for f in ensemble]
    assert len({r.shape[0] for r in refs}) == 1 and refs[0].shape[0] >= 2
    with pytest.raises(ConfigError, match=r"protect\.boosters\.negatives\.root=.* shares \d+ identities"):
        reference_embeddings(compose(args), {**negatives, "root": str(faces_mini / "lfw")}, ensemble)
    # the whiten booster gets its own reference faces the same way, through build_method
    whiten = [
        f"protect.boosters.whiten.{k}={v}"
        for k, v in (("strength", 0.5), ("root", lfw_train), ("identities", 2))
    ]
    method, *_ = build_method(compose([*args, *whiten]), ensemble, blackbox=[])
    assert [tuple(getattr(method, f"whiten_matrix_{i}").shape) for i in range(len(ensemble))] == [
        (r.shape[1], r.shape[1]) for r in refs
    ]
    with pytest.raises(ConfigError, match=r"protect\.boosters\.whiten\.root=.* shares \d+ identities"):
        build_method(
            compose([*args, *whiten, f"protect.boosters.whiten.root={faces_mini / 'lfw'}"]),
            ensemble,
            blackbox=[],
        )


def test_margin_weights_follow_the_thresholds(zoo, faces):
    """A surrogate already past its threshold + stop_margin stops pulling: with thresholds -1 (always
    past) and 1 (never) the ensemble ascends like the second surrogate alone."""
    surrogates = [zoo[n] for n in SURROGATES]
    margin = {"margin": {"enabled": True, "stop_margin": 0.1}}
    weighted = LFSA(surrogates, steps=2, boosters=margin, thresholds=[-1.0, 1.0])(faces, SEEDS)
    second = LFSA(surrogates, steps=2, betas=[0.0, 1.0])(faces, SEEDS)
    torch.testing.assert_close(weighted, second, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="boosters.margin: needs the surrogates' calibrated thresholds"):
        LFSA(surrogates, boosters=margin)


def test_margin_stops_an_image_whose_surrogates_are_all_past(zoo, faces):
    """With every surrogate past its threshold nothing pulls, not even the entropy term: the image
    stays at its start X0 (the same seeds draw the same fill and noise)."""
    surrogates = [zoo[n] for n in SURROGATES]
    margin = {"margin": {"enabled": True, "stop_margin": 0.1}}
    done = LFSA(surrogates, steps=2, boosters=margin, thresholds=[-1.0, -1.0])(faces, SEEDS)
    start = LFSA(surrogates, steps=0)(faces, SEEDS)
    torch.testing.assert_close(done, start, atol=0, rtol=0)
    moving = LFSA(surrogates, steps=2, boosters=margin, thresholds=[-1.0, 1.0])(faces, SEEDS)
    assert (moving - start).abs().mean() > 1e-3


def test_monitors_watch_without_changing_the_result(zoo, faces, plain):
    method = LFSA(
        [zoo[n] for n in SURROGATES],
        steps=3,
        thresholds=[0.3, 0.3],
        monitors=[zoo["mobilefacenet_tf"]],
        monitor_every=2,
    )
    out = method(faces, SEEDS)
    history = method.last_history
    box = history["monitor/mobilefacenet_tf"]
    assert [math.isnan(v) for v in box] == [False, True, False]  # steps 0, 2 (every 2) and the last
    assert all(-1 <= v <= 1 for v in box if not math.isnan(v))
    assert set(history) >= {f"monitor/{n}" for n in SURROGATES} | {f"cos/{n}" for n in SURROGATES}
    assert all(len(v) == 3 for v in history.values())
    quiet = LFSA([zoo[n] for n in SURROGATES], steps=3, thresholds=[0.3, 0.3])
    torch.testing.assert_close(out, quiet(faces, SEEDS), atol=0, rtol=0)  # outputs only, no gradient
    with pytest.raises(ConfigError, match="monitor must be a model outside the ensemble"):
        LFSA([zoo[n] for n in SURROGATES], monitors=[zoo[SURROGATES[0]]])


def test_wilson_interval():
    low, high = wilson(64, 64)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.9434, abs=1e-3)
    low, high = wilson(1, 2)
    assert low < 0.5 < high


def calibrated(faces_mini, models_dir, align_cache, tmp_path, models: list[str], pairs: int) -> list[str]:
    """The arguments of a small faces-mini/lfw run over `models`, after experiment=verify has written
    their thresholds to the run's calibration file."""
    common = [
        "data=lfw",
        f"data.root={faces_mini / 'lfw'}",
        f"data.subset.pairs={pairs}",
        f"data.cache_dir={align_cache}",
        f"paths.models={models_dir}",
        f"recognizer=[{','.join(models)}]",
        f"calibration_file={tmp_path / 'calibration.json'}",
        "logger=csv",
        "trainer=cpu",
    ]
    main(["experiment=verify", *common, f"run_dir={tmp_path / 'verify'}"])
    return common


@pytest.mark.slow
def test_transfer_experiment_writes_its_table_and_resumes(
    faces_mini, lfw_train, models_dir, align_cache, tmp_path
):
    common = calibrated(faces_mini, models_dir, align_cache, tmp_path, SURROGATES, pairs=6)
    args = [
        "experiment=transfer",
        *common,
        f"run_dir={tmp_path / 'transfer'}",
        "transfer.faces=2",
        "transfer.monitor_every=2",
        "protect.steps=3",
        "protect.boosters.margin.enabled=true",  # the surrogates' thresholds come from the file too
        "protect.boosters.negatives.weight=0.5",  # and the reference faces' embeddings from lfw-train
        f"protect.boosters.negatives.root={lfw_train}",
        "protect.boosters.negatives.identities=2",
        "generate.batch_size=2",
        "eval.grid=2",
        "seed=0",
    ]
    results = main(args)
    run = tmp_path / "transfer"
    heldout = results["transfer"]["heldout"]
    assert set(heldout) == set(SURROGATES)
    for name, row in heldout.items():
        assert name not in row["ensemble"] and row["ensemble"]  # every other model, never the black box
        assert row["n"] == 2 and row["generated_now"] == 2 and row["images_per_s"] > 0
        low, high = row["match_ci95"]
        assert 0 <= low <= row["match"] <= high <= 1
        assert 0 < row["ssim"] < 0.9 and row["psnr"] > 0 and -1 <= row["cos_mean"] <= 1
        assert row["impostor_pairs"] == 2 and 0 <= row["far_excess_p"] <= 1  # two faces, two people
        # two faces: one clean impostor score, counted both ways, so no spread and no slope
        assert row["impostor_cos_std_clean"] < 1e-6 and math.isnan(row["impostor_cos_slope"])
        assert -1 <= row["impostor_cos_mean_protected"] <= 1 and row["impostor_cos_std_protected"] >= 0
        assert f"monitor/{name}" in row["curve"]["keys"] and len(row["curve"]["rows"]) == 3
        start = row["start"]  # the model's view of X0, before the three steps moved it
        assert 0 <= start["match"] <= 1 and 0 < start["ssim"] < 1 and start["cos_mean"] != row["cos_mean"]
        assert len((run / "protected" / name / "manifest.jsonl").read_text().splitlines()) == 2
        assert (run / "images" / f"transfer_grid_{name}.png").is_file()
    table = list(csv.reader((run / "transfer_table.csv").read_text().splitlines()))
    assert table[0][:3] == ["held out", "match", "95% CI"] and {r[0] for r in table[1:]} == set(SURROGATES)
    curves = list(csv.DictReader((run / "transfer_curves.csv").read_text().splitlines()))
    assert {r["series"] for r in curves} >= {f"{n} (held out)" for n in SURROGATES}
    assert json.loads((run / "results.json").read_text())["transfer"]["summary"]["faces"] == 2
    # The same command again finds both sets finished: nothing is generated, the numbers stay.
    again = main(args)["transfer"]["heldout"]
    for name, row in again.items():
        assert row["generated_now"] == 0 and row["match"] == heldout[name]["match"]
        assert row["curve"] == heldout[name]["curve"]


def test_held_out_model_is_the_only_black_box(models_dir):
    """experiment=transfer puts every model but the held-out one in the ensemble, dlib_resnet included,
    although dlib_resnet is a default black box of eval.blackbox: the held-out model is the black box."""
    from ppfr.config import compose
    from ppfr.errors import ConfigError

    cfg = compose(["experiment=transfer", f"paths.models={models_dir}", "protect.steps=1"])
    ensemble = recognizers.create_many(["mobileface_becauseofai", "dlib_resnet"], models_dir)
    box = recognizers.create_many(["mobilefacenet_relu6"], models_dir)
    method, method_cfg, models, blackbox = build_method(cfg, ensemble, monitors=box, blackbox=box)
    assert [r.name for r in blackbox] == ["mobilefacenet_relu6"]
    assert method_cfg["ensemble"] == ["mobileface_becauseofai", "dlib_resnet"]
    assert set(models) == {"mobileface_becauseofai", "dlib_resnet"} and all(models.values())
    with pytest.raises(ConfigError, match="dlib_resnet"):  # the default black boxes do collide
        build_method(cfg, ensemble)


def test_grid_points_are_every_combination_and_bad_keys_are_named():
    from ppfr.config import compose
    from ppfr.tasks.transfer import grid_points

    assert grid_points(compose(["experiment=transfer"])) == [("", {})]  # no grid: the plain run
    cfg = compose(
        ["experiment=transfer", "transfer.grid.gamma=[0,5]", "transfer.grid.highpass.omega_c=[0.02]"]
    )
    points = grid_points(cfg)
    assert [label for label, _ in points] == [
        "gamma=0,highpass.omega_c=0.02",
        "gamma=5,highpass.omega_c=0.02",
    ]
    assert points[1][1] == {"gamma": 5, "highpass.omega_c": 0.02}
    regions = grid_points(
        compose(["experiment=transfer", "transfer.grid.prune.regions=[[eyes],[eyes,nose]]"])
    )
    assert [label for label, _ in regions] == ["prune.regions=eyes", "prune.regions=eyes+nose"]
    with pytest.raises(ConfigError, match=r"transfer.grid.gama: protect=lfsa has no key 'gama'"):
        grid_points(compose(["experiment=transfer", "transfer.grid.gama=[0,5]"]))
    with pytest.raises(ConfigError, match="non-empty list"):
        grid_points(compose(["experiment=transfer", "transfer.grid.gamma=5"]))


@pytest.mark.slow
def test_tradeoff_grid_writes_a_row_and_a_set_per_point(faces_mini, models_dir, align_cache, tmp_path):
    models = ["mobilefacenet_relu6", "mobileface_becauseofai"]
    common = calibrated(faces_mini, models_dir, align_cache, tmp_path, models, pairs=4)
    args = [
        "experiment=transfer",
        *common,
        f"run_dir={tmp_path / 'tradeoff'}",
        "transfer.heldout=[mobilefacenet_relu6]",
        "transfer.faces=2",
        "transfer.grid.highpass.omega_c=[0.02,0.3]",
        "protect.steps=2",
        "generate.batch_size=2",
        "seed=0",
    ]
    results = main(args)["transfer"]
    run = tmp_path / "tradeoff"
    assert set(results["heldout"]) == {
        "highpass.omega_c=0.02/mobilefacenet_relu6",
        "highpass.omega_c=0.3/mobilefacenet_relu6",
    }
    for key, row in results["heldout"].items():
        assert row["heldout"] == "mobilefacenet_relu6" and row["ensemble"] == ["mobileface_becauseofai"]
        assert row["point"] == {"highpass.omega_c": float(key.split("=")[1].split("/")[0])}
        assert len((run / "protected" / key / "manifest.jsonl").read_text().splitlines()) == 2
    table = list(csv.DictReader((run / "transfer_tradeoff.csv").read_text().splitlines()))
    assert [r["point"] for r in table] == ["highpass.omega_c=0.02", "highpass.omega_c=0.3"]
    assert all(float(r["match low"]) <= float(r["match"]) <= float(r["match high"]) for r in table)
    ssim = [float(r["SSIM"]) for r in table]
    assert ssim[0] != ssim[1]  # a different cutoff is a different image
    assert (run / "images" / "transfer_tradeoff.png").is_file()
