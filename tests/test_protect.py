"""The LFSA parts and method on real aligned faces and real recognizers (CPU, a few steps)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import first_faces

from ppfr import recognizers
from ppfr.config import load_option, to_dict
from ppfr.errors import ConfigError
from ppfr.protect import create, parts
from ppfr.protect.lfsa import LFSA
from ppfr.template import ARCFACE_112

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["paper", "lfsa", "lfsa_transfer", "wo_f", "wo_c", "wo_p"]
SURROGATE = "mobilefacenet_relu6"


@pytest.fixture(scope="module")
def faces(faces_mini, align_cache) -> torch.Tensor:
    """Two real aligned LFW faces of different people, 2 x 3 x 112 x 112 in [0,1]."""
    return first_faces(faces_mini, align_cache, 2)


@pytest.fixture(scope="module")
def surrogate(models_dir):
    return recognizers.create(SURROGATE, models_dir)


def gens(*seeds: int) -> list[torch.Generator]:
    return parts.generators(torch.tensor(seeds), "cpu")


def cos(rec, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cosine_similarity(rec(a), rec(b), dim=1)


# ---------------------------------------------------------------- F


def test_highpass_removes_low_frequencies(faces):
    d = parts.highpass(faces, 0.05, rescale="none")
    assert d.mean(dim=(2, 3)).abs().max() < 1e-5  # zero-mean detail
    spectrum = torch.fft.fft2(d).abs()
    u = torch.fft.fftfreq(112)
    low = (u[:, None] ** 2 + u[None, :] ** 2).sqrt() <= 0.05
    assert spectrum[..., low].max() < 1e-3 * spectrum.max()
    assert spectrum[..., ~low].max() > 0.1 * torch.fft.fft2(faces).abs()[..., ~low].max()
    # omega_c = 0 drops only the DC term: everything else is kept
    whole = parts.highpass(faces, 0.0, rescale="none")
    torch.testing.assert_close(whole, faces - faces.mean(dim=(2, 3), keepdim=True), atol=1e-5, rtol=0)


def test_highpass_rescales(faces):
    shown = parts.highpass(faces, 0.05)
    assert shown.amin(dim=(1, 2, 3)).abs().max() < 1e-6 and (shown.amax(dim=(1, 2, 3)) - 1).abs().max() < 1e-6
    d = parts.highpass(faces, 0.05, rescale="none")
    torch.testing.assert_close(parts.highpass(faces, 0.05, "offset", gain=3.0), (0.5 + 3 * d).clamp(0, 1))
    with pytest.raises(ConfigError, match="rescale"):
        parts.highpass(faces, 0.05, rescale="log")


# ---------------------------------------------------------------- C


def test_keep_mask_covers_eyes_not_cheeks():
    for size in (112, 224):
        s = size / 112
        mask = parts.keep_mask(size, ("eyes",), radius=(18, 13), softness=2.0)[0, 0]
        assert mask.shape == (size, size)
        for x, y in ARCFACE_112[:2]:
            assert mask[int(y * s), int(x * s)] == 1
        for x, y in ((25, 85), (87, 85), *ARCFACE_112[2:]):  # cheeks, nose, mouth
            assert mask[int(y * s), int(x * s)] == 0
    nose = parts.keep_mask(112, ("nose",), radius=8, shape="box", softness=0)[0, 0]
    assert nose[71, 56] == 1 and nose[71, 56 + 9] == 0 and set(nose.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ConfigError, match="regions"):
        parts.keep_mask(112, ("ears",))


def test_stochastic_fill_keeps_mask_and_draws_from_local_statistics(faces):
    mask = parts.keep_mask(112, ("eyes",))
    out = parts.stochastic_fill(faces, mask, kappa=1.0, window=31, gens=gens(1, 2))
    inside, outside = mask[0, 0] == 1, mask[0, 0] == 0
    torch.testing.assert_close(out[..., inside], faces[..., inside])
    assert (out[..., outside] - faces[..., outside]).abs().mean() > 0.02
    assert out[..., outside].min() > 0 and out[..., outside].max() < 1  # squashed, never clipped
    # over a big region the fill averages to the local mean of the image there
    mean, std = parts.local_stats(faces, 31)
    region = (slice(None), slice(None), slice(70, 110), slice(10, 100))
    assert (out[region].mean(dim=(2, 3)) - mean[region].mean(dim=(2, 3))).abs().max() < 0.03
    # the spread follows kappa * sigma
    wide = parts.stochastic_fill(faces, mask, kappa=3.0, window=31, gens=gens(1, 2))
    assert (wide - mean)[region].std() > 2 * (out - mean)[region].std()
    torch.testing.assert_close(parts.stochastic_fill(faces, mask, 1.0, 31, gens(1, 2)), out)
    assert not torch.equal(parts.stochastic_fill(faces, mask, 1.0, 31, gens(3, 4)), out)


# ---------------------------------------------------------------- P


def test_perlin_noise_range_smoothness_and_seeds():
    noise = parts.perlin_noise(3, 112, gens(1, 2, 3), octaves=1, scale=16.0)
    assert noise.shape == (3, 1, 112, 112)
    assert torch.allclose(noise.amin(dim=(1, 2, 3)), torch.zeros(3)) and torch.allclose(
        noise.amax(dim=(1, 2, 3)), torch.ones(3)
    )
    a, b = noise[:, 0, :, :-1].flatten(), noise[:, 0, :, 1:].flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.95  # smooth at the lattice scale
    torch.testing.assert_close(parts.perlin_noise(3, 112, gens(1, 2, 3), octaves=1, scale=16.0), noise)
    # an item depends only on its own seed, not on the batch it is in
    torch.testing.assert_close(parts.perlin_noise(1, 112, gens(2), octaves=1, scale=16.0)[0], noise[1])
    assert (noise[0] - noise[2]).abs().mean() > 0.05
    # drawing again from the same generators gives a fresh field (the temporal seed)
    g = gens(1)
    assert not torch.equal(parts.perlin_noise(1, 112, g, octaves=1), parts.perlin_noise(1, 112, g, octaves=1))


def test_perlin_octaves_add_high_frequencies():
    def high_share(octaves: int) -> float:
        n = parts.perlin_noise(8, 112, gens(*range(8)), octaves=octaves, persistence=0.6, scale=32.0)
        power = torch.fft.fft2(n - n.mean(dim=(2, 3), keepdim=True)).abs() ** 2
        u = torch.fft.fftfreq(112)
        high = (u[:, None] ** 2 + u[None, :] ** 2).sqrt() > 0.1
        return float(power[..., high].sum() / power.sum())

    one, four = high_share(1), high_share(4)
    assert four > 3 * one


def test_entropy_orders_images_and_is_differentiable(faces):
    uniform = parts.histogram_entropy(torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0)))
    constant = parts.histogram_entropy(torch.full((2, 3, 112, 112), 0.3))
    natural = parts.histogram_entropy(faces)
    assert (uniform > natural).all() and (natural > constant).all() and uniform.max() <= 1
    x = faces.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(parts.histogram_entropy(x, bins=32, bandwidth=1.5).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # one ascent step along the gradient raises the entropy
    step = faces + 0.02 * grad / grad.abs().amax()
    assert (parts.histogram_entropy(step, 32, 1.5) > parts.histogram_entropy(faces, 32, 1.5)).all()


def test_boosters_off_have_no_effect(faces):
    draws = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(parts.input_diversity(faces, draws, prob=0.0, scale=0.1, shift=0.1), faces)
    moved = parts.input_diversity(faces, draws, prob=1.0, scale=0.1, shift=0.1)
    assert (moved - faces).abs().mean() > 0.01
    u = torch.rand(64, 4, generator=torch.Generator().manual_seed(1))
    assert parts.model_dropout(u, 0.0).eq(1).all()
    assert parts.model_dropout(u, 0.999).sum(1).eq(1).all()  # at least one surrogate stays


# ---------------------------------------------------------------- LFSA


def small(surrogate, **kwargs) -> LFSA:
    cfg = {"steps": 3, "alpha": 0.5, "boosters": {"input_diversity": {"enabled": True}}, **kwargs}
    return LFSA([surrogate], **cfg)


def test_lfsa_raises_surrogate_similarity_and_is_stochastic(faces, surrogate):
    method = small(surrogate)
    seeds = torch.tensor([11, 12])
    stages = method.stages(faces, seeds)
    out = stages["protected"]
    assert out.shape == faces.shape and out.min() >= 0 and out.max() <= 1
    assert set(stages) == {"original", "F", "C", "protected"}
    assert (cos(surrogate, faces, out) > cos(surrogate, faces, stages["C"]) + 0.05).all()
    assert len(method.last_history["loss"]) == 3
    torch.testing.assert_close(method(faces, seeds), out)  # same seeds: same output
    other = method(faces, torch.tensor([13, 14]))
    assert (other - out).abs().mean() > 0.01  # X -> X' is not a function
    # an item depends on its own seed and input only, not on the rest of the batch
    # (float sums differ slightly with batch size: a few pixels may move by ~1e-4 after 3 steps)
    alone = method(faces[1:], seeds[1:])
    torch.testing.assert_close(alone, out[1:], atol=2e-3, rtol=0)
    assert (alone - out[1:]).abs().mean() < 1e-4


def test_lfsa_ablations_change_the_path(faces, surrogate):
    seeds = torch.tensor([5, 6])
    full = LFSA([surrogate], steps=0).stages(faces, seeds)
    assert not torch.allclose(full["F"], faces) and not torch.allclose(full["C"], full["F"])
    torch.testing.assert_close(full["protected"], full["C"])  # T = 0: X' = X0
    wo_f = LFSA([surrogate], steps=0, highpass={"enabled": False}).stages(faces, seeds)
    torch.testing.assert_close(wo_f["F"], faces)  # w/o F: start from X
    mask = parts.keep_mask(112)[0, 0] == 1
    torch.testing.assert_close(wo_f["C"][..., mask], faces[..., mask])
    wo_c = LFSA([surrogate], steps=0, prune={"enabled": False}).stages(faces, seeds)
    torch.testing.assert_close(wo_c["C"], full["F"])  # w/o C: no pruning
    wo_p = LFSA([surrogate], steps=2, gamma=5.0, noise={"enabled": False})
    wo_p(faces, seeds)
    assert wo_p.last_history["entropy"] == [0.0, 0.0]  # w/o P: gamma = 0 and N' = 1
    with_p = LFSA([surrogate], steps=2, gamma=5.0)
    with_p(faces, seeds)
    assert min(with_p.last_history["entropy"]) > 0.5


def test_lfsa_runs_inside_inference_mode(faces, surrogate):
    method = small(surrogate, steps=1)
    seeds = torch.tensor([1, 2])
    expected = method(faces, seeds)
    with torch.inference_mode():
        x = faces.clone()  # an inference tensor, as a Lightning predict loop hands it over
        with torch.enable_grad():
            out = method(x, seeds)
    torch.testing.assert_close(out, expected)


def test_lfsa_under_bf16_autocast(faces, surrogate):
    method = small(surrogate, steps=1)
    seeds = torch.tensor([1, 2])
    plain = method.stages(faces, seeds)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = method.stages(faces, seeds)
    torch.testing.assert_close(mixed["C"], plain["C"])  # F and C stay in float32 under autocast
    out = mixed["protected"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert (out - plain["protected"]).abs().mean() < 0.01


def test_create_checks_keys(surrogate):
    with pytest.raises(ConfigError, match="unknown .*method 'nope'.*lfsa"):
        create({"name": "nope"}, [surrogate])
    with pytest.raises(ConfigError, match="stepz.*valid keys"):
        create({"name": "lfsa", "stepz": 3}, [surrogate])
    with pytest.raises(ConfigError, match=r"protect\.prune: unknown key\(s\) kapa"):
        create({"name": "lfsa", "prune": {"kapa": 1}}, [surrogate])
    with pytest.raises(ConfigError, match=r"protect\.boosters\.input_diversity: unknown key\(s\) zoom"):
        create({"name": "lfsa", "boosters": {"input_diversity": {"zoom": 1}}}, [surrogate])
    with pytest.raises(ConfigError, match="noise.mode"):
        create({"name": "lfsa", "noise": {"mode": "mix"}}, [surrogate])
    with pytest.raises(ConfigError, match="ensemble"):
        create({"name": "lfsa", "ensemble": ["mobilefacenet_tf"]}, [surrogate])
    with pytest.raises(ConfigError, match="ensemble"):
        create({"name": "lfsa"}, None)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build(preset, models_dir):
    cfg = to_dict(load_option("protect", preset))  # composed: the deltas over paper / lfsa
    ensemble = recognizers.create_many(list(cfg["ensemble"]), models_dir)
    method = create(cfg, ensemble)
    assert method.steps == cfg["steps"] and len(method.recognizers) == len(cfg["ensemble"])


def test_presets_are_deltas_of_the_paper():
    paper, lfsa = (to_dict(load_option("protect", n)) for n in ("paper", "lfsa"))
    assert not any(v["enabled"] for v in [paper["boosters"]["input_diversity"], paper["boosters"]["margin"]])
    assert lfsa["boosters"]["input_diversity"]["enabled"]
    for name, key in (("wo_f", "highpass"), ("wo_c", "prune"), ("wo_p", "noise")):
        assert to_dict(load_option("protect", name)) == {**lfsa, key: {**lfsa[key], "enabled": False}}, name
    keep = {
        "highpass": {**lfsa["highpass"], "omega_c": 0.02},
        "prune": {**lfsa["prune"], "regions": ["eyes", "nose", "mouth"], "kappa": 2.5},
        "gamma": 20.0,
        "boosters": {
            **lfsa["boosters"],
            "views": {**lfsa["boosters"]["views"], "k": 4, "mirror": True, "rotate": 10.0},
        },
        "steps": 100,
        "stop_ssim": 0.098,
    }
    assert to_dict(load_option("protect", "lfsa_transfer")) == {**lfsa, **keep}


def test_constructor_defaults_are_the_paper_preset(surrogate):
    cfg = to_dict(load_option("protect", "paper"))
    cfg.pop("ensemble")
    preset, default = create(cfg, [surrogate]), LFSA([surrogate])
    keys = ("highpass", "prune", "noise", "entropy", "boosters", "gamma", "alpha", "sign_step", "mu", "p")
    for key in (*keys, "steps", "stop_ssim", "update"):
        assert getattr(preset, key) == getattr(default, key), key


def test_default_preset_end_to_end(faces, models_dir):
    cfg = to_dict(load_option("protect", "lfsa"))
    ensemble = recognizers.create_many(list(cfg["ensemble"]), models_dir)
    method = create({**cfg, "steps": 1}, ensemble).to("cpu")  # moves like any module
    out = method(faces, torch.tensor([1, 2]))
    assert out.shape == faces.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------- issue 7: sign steps and ranges


def test_sign_update_keeps_pixels_off_the_bounds(faces, surrogate):
    """update=sign has its own step in pixel units: alpha=1 there saturated 86 % of pixels in 3 steps."""
    method = LFSA([surrogate], steps=3, update="sign")
    seeds = torch.tensor([1, 2])
    out = method.stages(faces, seeds)
    at_bounds = ((out["protected"] == 0) | (out["protected"] == 1)).float().mean()
    assert at_bounds < 0.05
    assert 0.001 < (out["protected"] - out["C"]).abs().mean() <= 3 * method.sign_step
    assert method.last_history["cos"][-1] > method.last_history["cos"][0]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"highpass": {"omega_c": 0.75}}, "highpass.omega_c"),  # above 0.707: a black image
        ({"highpass": {"omega_c": 0.0}}, "highpass.omega_c"),
        ({"alpha": "fast"}, "alpha"),
        ({"alpha": 0}, "alpha"),
        ({"steps": "abc"}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"sign_step": 0}, "sign_step"),
        ({"mu": 1.5}, "mu"),
        ({"gamma": -1}, "gamma"),
        ({"p": 3}, "p"),
        ({"prune": {"kappa": -0.1}}, "prune.kappa"),
        ({"prune": {"window": 30}}, "prune.window"),
        ({"prune": {"radius": [18.0, 0.0]}}, "prune.radius"),
        ({"noise": {"octaves": 0}}, "noise.octaves"),
        ({"noise": {"persistence": 1.5}}, "noise.persistence"),
        ({"noise": {"lacunarity": 1.0}}, "noise.lacunarity"),
        ({"noise": {"enabled": "yes"}}, "noise.enabled"),
        ({"entropy": {"bins": 1}}, "entropy.bins"),
        ({"betas": [-1.0]}, "betas"),
        ({"boosters": {"input_diversity": {"prob": 2}}}, "boosters.input_diversity.prob"),
        ({"boosters": {"ti_kernel": 4}}, "boosters.ti_kernel"),
        ({"boosters": {"ti_kernel": 1}}, "boosters.ti_kernel"),
        ({"boosters": {"model_dropout": 1.0}}, "boosters.model_dropout"),
        ({"boosters": {"feature_dropout": {"rate": 1.0}}}, "boosters.feature_dropout.rate"),
        (
            {"boosters": {"feature_dropout": {"rate": 0.1, "layers": [1.5]}}},
            "boosters.feature_dropout.layers",
        ),
        ({"boosters": {"linear_backward": {"start": 1.5}}}, "boosters.linear_backward.start"),
        ({"boosters": {"linear_backward": {"enabled": 1}}}, "boosters.linear_backward.enabled"),
        ({"boosters": {"views": {"k": -1}}}, "boosters.views.k"),
        ({"boosters": {"views": {"resample": 0}}}, "boosters.views.resample"),
        ({"boosters": {"variance_tuning": {"radius": 0}}}, "boosters.variance_tuning.radius"),
        ({"boosters": {"margin": {"temperature": 0}}}, "boosters.margin.temperature"),
        ({"boosters": {"margin": {"enabled": True}}}, "boosters.margin"),  # no thresholds given
        ({"boosters": {"lowres": {"size": 2}}}, "boosters.lowres.size"),
        ({"monitor_every": 0}, "monitor_every"),
        ({"stop_ssim": 1.0}, "stop_ssim"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_every_numeric_key_is_range_checked(surrogate, change, key):
    with pytest.raises(ConfigError, match=rf"^protect\.{key}: ") as err:
        create({"name": "lfsa", **change}, [surrogate])
    assert "\n" not in str(err.value)
    LFSA([surrogate], highpass={"omega_c": 0.7})  # just below the highest radius: still an image


# ---------------------------------------------------------------- views and the device loop


def test_views_resample_and_rotate(faces):
    still = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.5, 1.0]]).expand(2, 6)  # no jitter, the lowest factor
    half = parts.input_diversity(faces, still, 1.0, 0.1, 0.1, rotate=10.0, resample=0.5)
    down_up = F.interpolate(F.interpolate(faces, size=56, mode="bilinear"), size=112, mode="bilinear")
    assert (half - down_up).abs().mean() < 1e-3 < (half - faces).abs().mean()
    turn = torch.tensor([[0.0, 0.5, 0.5, 0.5, 1.0, 0.0]]).expand(2, 6)  # the largest angle, factor 1
    turned = parts.input_diversity(faces, turn, 1.0, 0.1, 0.1, rotate=90.0, resample=0.5)
    torch.testing.assert_close(turned, faces.rot90(1, (2, 3)), atol=1e-4, rtol=0)
    level = torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.5, 0.0]]).expand(2, 6)  # no jitter, factor 1
    mirrored = parts.input_diversity(faces, level, 1.0, 0.1, 0.1, rotate=10.0, resample=0.5, mirror=True)
    torch.testing.assert_close(mirrored, faces.flip(-1), atol=1e-4, rtol=0)
    # without rotate/resample the 5th and 6th draws are not read: the plain rescale-and-shift view
    draws = torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        parts.input_diversity(faces, draws, 1.0, 0.1, 0.1),
        parts.input_diversity(faces, draws[:, :4], 1.0, 0.1, 0.1),
    )


def test_generator_streams_are_independent():
    def first(stream: int) -> torch.Tensor:
        return torch.rand(8, generator=parts.generators(torch.tensor([7]), "cpu", stream)[0])

    assert torch.equal(first(1), first(1)) and not torch.equal(first(0), first(1))
    torch.testing.assert_close(first(0), torch.rand(8, generator=torch.Generator().manual_seed(7)))


def test_ascent_loop_reads_nothing_back_to_the_host(faces, surrogate, models_dir, monkeypatch):
    """Noise, entropy, views, boosters and monitors stay on the device: the read-backs of ppfr code
    (each would stall a GPU) do not grow with the number of steps."""
    monitor = recognizers.create("mobilefacenet_tf", models_dir)
    boosters = {
        "input_diversity": {"enabled": True},
        "views": {"k": 2, "rotate": 5.0, "resample": 0.7},
        "feature_dropout": {"rate": 0.02},
        "variance_tuning": {"n": 1},
        "margin": {"enabled": True},
        "lowres": {"size": 28},
        "ti_kernel": 5,
        "model_dropout": 0.2,
    }
    package = str(Path(parts.__file__).parents[1])
    reads: list[tuple[str, int]] = []

    def spying(real):
        def spy(self, *args, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(package):
                reads.append((caller.f_code.co_filename, caller.f_lineno))
            return real(self, *args, **kwargs)

        return spy

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, spying(getattr(torch.Tensor, name)))
    counts = []
    for steps in (1, 3):
        reads.clear()
        method = LFSA([surrogate], steps=steps, boosters=boosters, thresholds=[0.3], monitors=[monitor])
        method(faces, torch.tensor([1, 2]))
        counts.append(len(reads))
    assert counts[0] == counts[1] <= 3, reads  # the seeds of two generator streams and the history
