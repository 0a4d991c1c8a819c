"""The training-free baselines (blur, pixelate, noise, PartialFace, DuetFace) and their DCT, on real faces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import first_faces
from scipy.fft import dctn

from ppfr import recognizers
from ppfr.config import load_option, to_dict
from ppfr.errors import ConfigError
from ppfr.protect import classic, create, dct, duetface, partialface
from ppfr.protect.base import METHODS, ProtectionMethod

BASELINES = ("blur", "pixelate", "noise", "partialface", "duetface")


@pytest.fixture(scope="module")
def faces(faces_mini, align_cache) -> torch.Tensor:
    """Three real aligned LFW faces of different people, 3 x 3 x 112 x 112 in [0,1]."""
    return first_faces(faces_mini, align_cache, 3)


def preset(name: str, **change) -> ProtectionMethod:
    """The method as ``protect=<name>`` builds it (no surrogates), with keys changed."""
    return create({**to_dict(load_option("protect", name)), **change})


def seeds(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# ---------------------------------------------------------------- the contract, every method


@pytest.mark.parametrize("name", BASELINES)
def test_views_shapes_and_ranges(name, faces):
    method = preset(name)
    assert method.name == name and name in METHODS.names() and not method.needs_training
    s = seeds(1, 2, 3)
    shown = method(faces, s)
    assert shown.shape == faces.shape and shown.dtype == faces.dtype
    assert shown.min() >= 0 and shown.max() <= 1
    assert (shown - faces).abs().mean() > 0.01  # it changes the face
    rep = method.represent(faces, s)
    attack = method.attacker_input(faces, s)
    assert attack.shape == (3, method.attacker_channels, 112, 112)
    assert torch.isfinite(rep).all() and torch.isfinite(attack).all()
    expected = {"partialface": 27, "duetface": 162}.get(name, 3)
    assert rep.shape == (3, expected, 112, 112) and method.attacker_channels == expected
    if expected == 3:
        torch.testing.assert_close(rep, shown)
    else:  # the image switch gives the attacker the visible image instead
        image = preset(name, attacker_input="image")
        assert image.attacker_channels == 3
        torch.testing.assert_close(image.attacker_input(faces, s), shown)


@pytest.mark.parametrize("name", BASELINES)
def test_stochastic_or_deterministic_as_declared(name, faces):
    method = preset(name)
    same = faces[:1].expand(5, -1, -1, -1)
    s = seeds(*range(10, 15))
    out = method(same, s)
    torch.testing.assert_close(method(same, s), out, rtol=0, atol=0)  # a seed reproduces
    # an item depends on its own seed and input only, not on the batch around it
    torch.testing.assert_close(method(faces[:1], s[:1]), out[:1], rtol=0, atol=1e-6)
    rep = method.represent(same, s)
    torch.testing.assert_close(method.represent(same, s), rep, rtol=0, atol=0)
    spread = (out - out[:1]).abs().flatten(1).amax(1)
    rep_spread = (rep - rep[:1]).abs().flatten(1).amax(1) / rep.abs().max()
    if method.stochastic:  # other seeds, other outputs (PartialFace's image is near-flat: see its docs)
        assert spread.max() > 0 and rep_spread.max() > 0.05
    else:
        assert spread.max() == 0 and rep_spread.max() == 0


def test_bad_config_is_a_clear_error():
    for name, key, value in (
        ("blur", "sigma", 0),
        ("pixelate", "block", 0),
        ("noise", "std", -0.1),
        ("partialface", "attacker_input", "pixels"),
        ("duetface", "attacker_input", "pixels"),
        ("partialface", "visible", "bright"),
    ):
        with pytest.raises(ConfigError, match=f"protect.{key}"):
            preset(name, **{key: value})
    with pytest.raises(ConfigError, match="protect.name"):
        METHODS.get("minus")


# ---------------------------------------------------------------- classic


def test_classic_strengths(faces):
    s = seeds(1, 2, 3)
    mosaic = preset("pixelate")(faces, s)
    cells = mosaic.unflatten(2, (14, 8)).unflatten(4, (14, 8))  # B x C x 14 x 8 x 14 x 8
    torch.testing.assert_close(cells, cells[:, :, :, :1, :, :1].expand_as(cells))  # constant cells
    torch.testing.assert_close(
        cells[:, :, :, 0, :, 0], faces.unflatten(2, (14, 8)).unflatten(4, (14, 8)).mean((3, 5))
    )
    odd = classic.Pixelate(block=5)(faces, s)  # 112 = 22 * 5 + 2: the last cell is 2 px wide
    torch.testing.assert_close(odd[..., -1, -1], faces[..., -2:, -2:].mean((2, 3)))

    def roughness(x: torch.Tensor) -> float:
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    light, heavy = classic.Blur(sigma=1.0)(faces, s), classic.Blur(sigma=4.0)(faces, s)
    assert roughness(faces) > roughness(light) > 1.5 * roughness(heavy)
    impulse = torch.zeros(1, 3, 112, 112)
    impulse[..., 56, 56] = 1
    for sigma in (1.0, 3.0, 5.0):  # the response is the Gaussian of that sigma, in px
        response = classic.Blur(sigma=sigma)(impulse, s[:1])[0, 0]
        offsets = torch.arange(112.0) - 56
        assert float(response.sum()) == pytest.approx(1, abs=1e-5)
        assert float((response.sum(0) * offsets**2).sum()).__pow__(0.5) == pytest.approx(sigma, rel=0.03)
    flat = torch.full((1, 3, 112, 112), 0.3)
    torch.testing.assert_close(classic.Blur(sigma=3.0)(flat, s[:1]), flat)

    noisy = classic.Noise(std=0.05)(faces, s)
    inside = (faces > 0.2) & (faces < 0.8)  # 6 sigma away from the clipping
    assert abs(float((noisy - faces)[inside].std()) - 0.05) < 0.002
    assert abs(float((noisy - faces)[inside].mean())) < 0.002


# ---------------------------------------------------------------- the DCT


def test_block_dct_layout_matches_scipy_and_inverts():
    y = torch.rand(2, 3, 16, 24, dtype=torch.float64) * 255 - 128
    coef = dct.block_dct(y)
    assert coef.shape == (2, 3 * 64, 2, 3)
    block = y[1, 2, 8:16, 16:24].numpy()  # colour 2, block row 1, block col 2
    expected = dctn(block, norm="ortho")  # expected[row, col], row = vertical frequency
    for row, col in ((0, 0), (0, 1), (1, 0), (3, 5), (7, 7)):
        assert coef[1, 2 * 64 + 8 * row + col, 1, 2].item() == pytest.approx(expected[row, col], abs=1e-9)
    torch.testing.assert_close(dct.block_idct(coef), y, rtol=0, atol=1e-9)


def test_dct_round_trip_is_exact(faces):
    coef = dct.to_dct(faces)
    assert coef.shape == (3, 192, 112, 112) and coef.dtype == torch.float32
    # at the DCT level: the full-channel inverse gives back the x8 upsampled image
    torch.testing.assert_close(dct.to_image(coef), dct.upsample(faces), rtol=0, atol=1e-5)
    # the published resampling pair (bilinear, align_corners=True), as exact matrices ...
    wide = faces.double()
    published = F.interpolate(wide, scale_factor=8, mode="bilinear", align_corners=True)
    torch.testing.assert_close(dct.upsample(wide), published, rtol=0, atol=1e-12)
    published = F.interpolate(published, scale_factor=1 / 8, mode="bilinear", align_corners=True)
    torch.testing.assert_close(dct.downsample(dct.upsample(wide)), published, rtol=0, atol=1e-12)
    # ... is exact on images affine between pixel centres, so is the whole chain there
    yy, xx = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    ramp = torch.stack([0.2 + 0.005 * xx, 0.1 + 0.003 * yy + 0.002 * xx, 0.9 - 0.004 * yy])[None]
    torch.testing.assert_close(dct.from_dct(dct.to_dct(ramp)), ramp, rtol=0, atol=1e-5)
    # and on faces the chain is the resampling pair alone, which stays close to the face
    back = dct.from_dct(coef)
    torch.testing.assert_close(back, published.float().clamp(0, 1), rtol=0, atol=1e-5)
    assert (back - faces).abs().mean() < 2e-3
    # a flat grey face has only DC terms: Y DC = 8 * (255 * 0.5 - 128) per block, chroma 0
    grey = dct.to_dct(torch.full((1, 3, 112, 112), 0.5))
    assert grey[0, 0].allclose(torch.tensor(8 * (127.5 - 128.0)), atol=1e-3)
    assert grey[0, 1:].abs().max() < 1e-3
    white = dct.to_dct(torch.ones(1, 3, 112, 112))
    assert white[0, 0].allclose(torch.tensor(8 * 127.0), atol=1e-2) and white[0, 64:].abs().max() < 1e-2


# ---------------------------------------------------------------- PartialFace and DuetFace


def test_partialface_channel_sets():
    pruned = {8 * r + c for r in range(8) for c in range(8) if r + c <= 3}
    assert set(partialface.PRUNED) == pruned and len(pruned) == 10
    assert len(partialface.KEPT) == 54 and not set(partialface.KEPT) & pruned
    subsets = [set(s) for s in partialface.SUBSETS]
    assert len(subsets) == 6 and all(len(s) == 9 for s in subsets)
    assert (
        set().union(*subsets) == set(partialface.KEPT) and sum(map(len, subsets)) == 54
    )  # disjoint, covering
    assert all(sorted(p) == list(range(9)) for p in partialface.PERMUTATIONS)
    assert len(set(partialface.PERMUTATIONS)) == 3 and len(set(partialface.TRIPLES)) == 20


def test_partialface_representation(faces):
    method = preset("partialface")
    s = seeds(*range(40))
    index = method.channel_index(s)
    assert index.shape == (40, 27)
    subset, perm = method.choose(s)
    assert set(subset.tolist()) == set(range(6)) and set(perm.tolist()) == set(range(3))
    for b in range(40):  # the same 9 basis functions, permuted, in Y, Cb and Cr
        basis = [partialface.SUBSETS[subset[b]][i] for i in partialface.PERMUTATIONS[perm[b]]]
        assert index[b].tolist() == dct.channels(basis)
    x, s3 = faces, s[:3]
    coef = dct.to_dct(x)
    rep = method.represent(x, s3)
    torch.testing.assert_close(rep, torch.stack([coef[b, index[b]] for b in range(3)]))
    shown = dct.from_dct(dct.zero_filled(rep, index[:3]), stretch=True)
    torch.testing.assert_close(method(x, s3), shown)
    assert shown.amin((1, 2, 3)).max() == 0 and shown.amax((1, 2, 3)).min() == 1
    # TFace's clamped image of the kept channels is a near-flat grey: they hold almost no energy
    raw = preset("partialface", visible="raw")(x, s3)
    assert (raw - 128 / 255).abs().max() < 0.02
    assert float((rep**2).sum() / (coef**2).sum()) < 1e-4
    # with identity labels only the 3 subsets of the triple label % 20 are drawn
    labels = torch.arange(40) % 7 + 13
    chosen, _ = method.choose(s, labels)
    for label, c in zip(labels.tolist(), chosen.tolist(), strict=True):
        assert c in partialface.TRIPLES[label % 20]


def test_duetface_split(faces):
    client, server = set(duetface.CLIENT), set(duetface.SERVER)
    assert len(client) == 30 and len(server) == 162 and client | server == set(range(192))
    assert set(dct.channels([0, 1, 2, 3, 4, 5, 8, 9, 16, 24])) == client
    method = preset("duetface")
    s = seeds(1, 2, 3)
    coef = dct.to_dct(faces)
    torch.testing.assert_close(method.represent(faces, s), coef[:, list(duetface.SERVER)])
    coef[:, list(duetface.CLIENT)] = 0
    torch.testing.assert_close(method(faces, s), dct.from_dct(coef, stretch=True))
    torch.testing.assert_close(preset("duetface", visible="raw")(faces, s), dct.from_dct(coef))


@pytest.mark.slow
def test_black_box_embeds_every_visible_image(faces, models_dir):
    rec = recognizers.create("dlib_resnet", models_dir)
    with torch.no_grad():
        clean = rec(faces)
        for name in BASELINES:
            emb = rec(preset(name)(faces, seeds(1, 2, 3)))
            assert emb.shape == clean.shape and torch.isfinite(emb).all(), name
            assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-4), name
