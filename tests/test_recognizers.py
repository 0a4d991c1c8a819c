"""The recognizer zoo on the real shared models: accuracy on real faces, onnxruntime parity,
input gradients, preprocessing geometry, PyTorch checkpoints and every error path."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from facenet_pytorch import InceptionResnetV1
from torch import nn

import datamodules
from ppfr import recognizers
from ppfr.errors import ConfigError, ModelError
from ppfr.recognizers import Recognizer
from ppfr.recognizers.base import affine_from_points
from ppfr.recognizers.facenet import box_affine
from ppfr.recognizers.iresnet import LAYERS, IResNet
from ppfr.recognizers.onnx import load_catalog
from ppfr.template import ARCFACE_112
from ppfr.verification import verify

# faces-mini/lfw fold 1: 20 genuine + 20 impostor pairs, ~65 faces (hse at 224 px is slow on CPU).
N_PAIRS = 40


@pytest.fixture(scope="module")
def zoo(models_dir) -> dict[str, Recognizer]:
    return {r.name: r for r in recognizers.create_many("all", models_dir)}


@pytest.fixture(scope="module")
def lfw(faces_mini, align_cache):
    dm = datamodules.create(
        {"name": "lfw", "root": faces_mini / "lfw", "subset": {"pairs": N_PAIRS}, "cache_dir": align_cache}
    )
    dm.prepare_data()
    dm.setup("predict")
    return torch.stack([dm.dataset[k]["image"] for k in range(len(dm.dataset))]), dm


def test_registry_lists_usable_models_and_families(models_dir, zoo):
    usable = [
        e["name"] for e in json.loads((models_dir / "models.json").read_text())["models"] if e["usable"]
    ]
    torch_archs = ["facenet", "iresnet100", "iresnet18", "iresnet34", "iresnet50"]
    assert recognizers.RECOGNIZERS.names() == torch_archs
    assert recognizers.available(models_dir) == usable + torch_archs
    assert list(zoo) == usable
    assert zoo["hse_faceres_deep"].family == zoo["hse_faceres"].family == "hse_faceres"
    others = [r.family for n, r in zoo.items() if n != "hse_faceres_deep"]
    assert len(set(others)) == len(others) == 6
    for entry in load_catalog(models_dir).values():
        assert zoo[entry["name"]].embedding_dim == entry["embedding_dim"]
        assert zoo[entry["name"]].sha256 == entry["sha256"]


@pytest.mark.slow
def test_every_recognizer_separates_real_lfw_pairs(zoo, lfw):
    images, dm = lfw
    assert int(dm.issame.sum()) == N_PAIRS // 2 and len(dm.pairs) == N_PAIRS
    for rec in zoo.values():
        with torch.no_grad():
            emb = torch.cat([rec(images[k : k + 64]) for k in range(0, len(images), 64)])
        assert emb.shape == (len(images), rec.embedding_dim) and emb.dtype == torch.float32
        assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-5)
        scores = F.cosine_similarity(emb[dm.pairs[:, 0]], emb[dm.pairs[:, 1]], dim=1)
        result = verify(scores, dm.issame, dm.folds)
        assert result["auc"] >= 0.95, (rec.name, result)


def test_onnx_to_torch_matches_onnxruntime(zoo, models_dir):
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    for entry in load_catalog(models_dir).values():
        rec = zoo[entry["name"]]
        with torch.no_grad():
            inputs = rec.preprocess(x)
            ours = rec.network(inputs).numpy()
        session = ort.InferenceSession(str(models_dir / entry["file"]), providers=["CPUExecutionProvider"])
        (theirs,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
        assert inputs.shape[2:] == tuple(entry["input_size"])
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4, err_msg=entry["name"])


def test_input_gradients_flow_and_networks_stay_frozen(zoo):
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    for rec in zoo.values():
        rec.train()  # a caller switching modes must not unfreeze BatchNorm statistics or dropout
        assert not rec.network.training
        assert not any(p.requires_grad for p in rec.parameters())
        x_in = x.clone().requires_grad_(True)
        target = torch.ones(rec.embedding_dim) / rec.embedding_dim**0.5
        F.cosine_similarity(rec(x_in), target[None]).sum().backward()
        assert torch.isfinite(x_in.grad).all() and x_in.grad.abs().sum() > 0, rec.name


def test_bf16_autocast_keeps_float32_unit_embeddings_and_input_gradients(zoo):
    """Mixed precision (Lightning's bf16-mixed, GPU autocast) forward and backward, PReLU models included:
    the frozen-PReLU backward once failed on a bf16 gradient against its float32 slopes."""
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    for name in ("mobileface_becauseofai", "dlib_resnet", "faceplugin_mobilefacenet", "mobilefacenet_tf"):
        rec = zoo[name]
        with torch.no_grad():
            target = rec(x.flip(-1))  # the method's loss: cos to an embedding, here of the mirrored face
        embs, grads = [], []
        for enabled in (False, True):
            x_in = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                emb = rec(x_in)
            grads.append(torch.autograd.grad(F.cosine_similarity(emb, target).sum(), x_in)[0])
            embs.append(emb.detach())
        assert embs[1].dtype == torch.float32, name
        assert F.cosine_similarity(embs[0], embs[1]).min() > 0.99, name
        assert torch.isfinite(grads[1]).all(), name
        # bf16 rounds the gradient (cos 0.78-0.99 to float32 measured on random inputs); unrelated ones give ~0
        assert F.cosine_similarity(grads[0].flatten(1), grads[1].flatten(1)).min() > 0.5, name


def _blobs(points: np.ndarray) -> torch.Tensor:
    """One image per point, a small Gaussian spot at that point of the 112 crop."""
    yy, xx = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    spots = [torch.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 4.5) for px, py in points.tolist()]
    return torch.stack(spots)[:, None].expand(-1, 3, -1, -1)


def _centroids(images: torch.Tensor) -> np.ndarray:
    h, w = images.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    weights = images / images.sum((-2, -1), keepdim=True)
    return torch.stack([(weights * xx).sum((-2, -1)), (weights * yy).sum((-2, -1))], -1).numpy()


@pytest.mark.parametrize("model", ["dlib_resnet", "hse_faceres", "facenet"])
def test_warp_moves_template_points_to_the_models_own_points(model, models_dir):
    if model == "facenet":
        affine, size, points = box_affine(), (160, 160), None
    else:
        entry = load_catalog(models_dir)[model]
        points = np.array(entry["alignment"]["points_xy"])
        affine, size = affine_from_points(points), tuple(entry["input_size"])
    rec = Recognizer(
        "probe",
        nn.Identity(),
        3,
        input_size=size,
        affine=affine,
        mean=(0, 0, 0),
        std=(255, 255, 255),
        sha256="0" * 64,
    )
    with torch.no_grad():
        warped = rec.preprocess(_blobs(ARCFACE_112))[:, 0]
    assert warped.shape[1:] == size
    expected = np.c_[ARCFACE_112, np.ones(5)] @ affine.T
    np.testing.assert_allclose(_centroids(warped), expected, atol=0.1)
    if points is not None:  # the least-squares similarity lands within 3 px of the catalog's points
        assert np.abs(expected - points).max() < 3.0


def test_template_models_skip_the_warp_and_apply_channel_order_and_values(zoo):
    assert zoo["mobilefacenet_tf"].theta is None and zoo["hse_faceres"].theta is not None
    red = torch.zeros(1, 3, 112, 112)
    red[:, 0] = 1.0
    with torch.no_grad():
        hse = zoo["hse_faceres"].preprocess(red)  # BGR, raw 0..255
        tf = zoo["mobilefacenet_tf"].preprocess(red)  # RGB, (x - 127.5) / 128
    assert hse.shape == (1, 3, 224, 224)
    assert hse[0, 2, 100, 100] == pytest.approx(255) and hse[0, 0, 100, 100] == 0
    assert tf[0, 0, 5, 5] == pytest.approx(127.5 / 128) and tf[0, 1, 5, 5] == pytest.approx(-127.5 / 128)


def test_iresnet_layouts_match_arcface_torch_keys():
    """Every depth, r100 included, checked on the meta device (no memory needed)."""
    with torch.device("meta"):
        state = {name: IResNet(layers).state_dict() for name, layers in LAYERS.items()}
    for name, blocks in LAYERS.items():
        keys = state[name]
        assert keys["fc.weight"].shape == (512, 512 * 7 * 7) and keys["features.weight"].shape == (512,)
        assert {
            "conv1.weight",
            "bn1.running_var",
            "prelu.weight",
            "bn2.weight",
            "features.running_mean",
        } <= set(keys)
        for stage, n in enumerate(blocks, start=1):
            assert (
                f"layer{stage}.0.downsample.0.weight" in keys
                and f"layer{stage}.0.downsample.1.running_var" in keys
            )
            assert f"layer{stage}.{n - 1}.bn3.weight" in keys and f"layer{stage}.{n}.bn1.weight" not in keys
            assert (
                f"layer{stage}.1.prelu.weight" in keys and f"layer{stage}.1.downsample.0.weight" not in keys
            )


def test_iresnet_checkpoint_round_trip(tmp_path):
    arch = "iresnet18"
    net = IResNet(LAYERS[arch]).eval()
    for module in net.modules():  # non-trivial statistics so a mis-loaded buffer shows
        if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = net.state_dict()
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # DDP-style checkpoint
    rec = recognizers.create(arch, weights=path)
    x = torch.rand(2, 3, 112, 112, requires_grad=True)
    emb = rec(x)
    assert emb.shape == (2, 512) and rec.embedding_dim == 512 and rec.family == arch
    assert rec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    with torch.no_grad():
        assert torch.allclose(emb, F.normalize(net((x - 0.5) / 0.5), dim=1), atol=1e-5)
    emb[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_facenet_checkpoint_round_trip(tmp_path):
    net = InceptionResnetV1(classify=True, num_classes=8631).eval()  # a vggface2 file carries logits
    path = tmp_path / "20180402-114759-vggface2.pt"
    torch.save(net.state_dict(), path)
    rec = recognizers.create("facenet", weights=path)
    assert rec.input_size == (160, 160)
    assert torch.equal(rec.network.last_linear.weight, net.last_linear.weight)
    x = torch.rand(1, 3, 112, 112, requires_grad=True)
    emb = rec(x)
    assert emb.shape == (1, 512)
    with torch.no_grad():
        net.classify = False
        assert torch.allclose(emb, net(rec.preprocess(x)), atol=1e-5)
    emb[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _catalog_copy(models_dir, tmp_path, **changes):
    """A models folder in tmp with only mobileface_becauseofai (the smallest file), entry changed."""
    entry = {**load_catalog(models_dir)["mobileface_becauseofai"], **changes}
    shutil.copy(models_dir / "mobileface_becauseofai.onnx", tmp_path / "mobileface_becauseofai.onnx")
    (tmp_path / "models.json").write_text(json.dumps({"models": [entry]}))
    return entry


def test_wrong_hash_names_expected_and_actual(models_dir, tmp_path):
    entry = _catalog_copy(models_dir, tmp_path, sha256="0" * 64)
    actual = load_catalog(models_dir)["mobileface_becauseofai"]["sha256"]
    with pytest.raises(
        ModelError,
        match=rf"mobileface_becauseofai\.onnx: sha256 mismatch: expected {entry['sha256']}.*got {actual}",
    ):
        recognizers.create("mobileface_becauseofai", tmp_path)


def test_missing_files_are_named(models_dir, tmp_path):
    _catalog_copy(models_dir, tmp_path, file="gone.onnx")
    with pytest.raises(ModelError, match=r"gone\.onnx: model file of mobileface_becauseofai not found"):
        recognizers.create("mobileface_becauseofai", tmp_path)
    with pytest.raises(ModelError, match=r"empty/models\.json: model catalog not found"):
        recognizers.create("mobileface_becauseofai", tmp_path / "empty")
    with pytest.raises(ModelError, match=r"nowhere\.pth: weight file not found"):
        recognizers.create("iresnet18", weights=tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"junk\.pth: cannot load as a PyTorch checkpoint"):
        recognizers.create("facenet", weights=tmp_path / "junk.pth")


def test_misfit_state_dict_lists_keys_and_shapes(tmp_path):
    state = IResNet(LAYERS["iresnet18"]).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    with pytest.raises(
        ModelError, match=r"r18\.pth: state dict does not fit IResNet; missing keys \(\d+\): layer1\.2\."
    ):
        recognizers.create("iresnet34", weights=path)
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    state["head.weight"] = torch.zeros(1)
    torch.save({"model": state}, path)
    with pytest.raises(
        ModelError,
        match=r"unexpected keys \(1\): head\.weight; shape mismatches \(1\): conv1\.weight: file \(64, 3, 5, 5\) vs model \(64, 3, 3, 3\)",
    ):
        recognizers.create("iresnet18", weights=path)


def test_config_errors_name_the_choices(models_dir):
    with pytest.raises(
        ConfigError,
        match=r"recognizer\.names: unknown recognizer 'arcface'; available: mobilefacenet_tf, .*hse_faceres_deep, facenet, iresnet100",
    ):
        recognizers.create("arcface", models_dir)
    with pytest.raises(
        ConfigError,
        match=r"'iresnet50' is a PyTorch architecture and needs a weight file.*recognizer\.weights\.iresnet50",
    ):
        recognizers.create("iresnet50", models_dir)
    with pytest.raises(ConfigError, match="more than once"):
        recognizers.create_many(["dlib_resnet", "dlib_resnet"], models_dir)


def test_check_disjoint_rejects_siblings_and_shared_models(zoo):
    recognizers.check_disjoint([zoo["mobilefacenet_tf"], zoo["hse_faceres_deep"]], [zoo["dlib_resnet"]])
    with pytest.raises(
        ConfigError, match="black box 'hse_faceres' and ensemble member 'hse_faceres_deep' are siblings"
    ):
        recognizers.check_disjoint([zoo["mobilefacenet_tf"], zoo["hse_faceres_deep"]], [zoo["hse_faceres"]])
    with pytest.raises(ConfigError, match="'dlib_resnet' is both in the ensemble and a black box"):
        recognizers.check_disjoint([zoo["dlib_resnet"]], [zoo["dlib_resnet"]])
