"""Native recognizers against onnxruntime and onnx2torch on real aligned faces, and the converter's
folding and errors on small graphs checked by onnxruntime itself."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import datamodules
from ppfr import protect, recognizers
from ppfr.config import load_option, to_dict
from ppfr.errors import ConfigError, ModelError
from ppfr.recognizers.native import ARCHITECTURES, convert
from ppfr.recognizers.native.layers import Arith, ConvAct, PReLU
from ppfr.recognizers.onnx import load_catalog


@pytest.fixture(scope="module")
def faces(faces_mini, align_cache) -> torch.Tensor:
    """Six real aligned LFW crops (three pairs of faces-mini fold 1)."""
    dm = datamodules.create(
        {"name": "lfw", "root": faces_mini / "lfw", "subset": {"pairs": 3}, "cache_dir": align_cache}
    )
    dm.prepare_data()
    dm.setup("predict")
    images = torch.stack([dm.dataset[k]["image"] for k in range(len(dm.dataset))])
    assert len(images) >= 4
    return images[:6]


def _onnxruntime(path, inputs: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]


def _input_gradient(rec, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cosine_similarity(rec(xg), targets).sum(), xg)
    return grad


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_native_matches_onnxruntime_and_onnx2torch_on_real_faces(name, models_dir, faces):
    entry = load_catalog(models_dir)[name]
    native = recognizers.create(name, models_dir)
    reference = recognizers.create(name, models_dir, backend="onnx")
    assert native.sha256 == reference.sha256 == entry["sha256"]
    assert type(native.network) is not type(reference.network)
    with torch.no_grad():
        inputs = native.preprocess(faces)
        ours = native.network(inputs)
    theirs = torch.from_numpy(_onnxruntime(models_dir / entry["file"], inputs))
    assert ours.shape == theirs.shape == (len(faces), entry["embedding_dim"])
    cos = F.cosine_similarity(ours, theirs)
    assert cos.min() >= 0.9999, (name, cos)

    with torch.no_grad():
        targets = native(faces.roll(1, 0))  # other faces: a gradient that does not vanish
    grad = _input_gradient(native, faces, targets)
    grad_ref = _input_gradient(reference, faces, targets)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    grad_cos = F.cosine_similarity(grad.flatten(1), grad_ref.flatten(1))
    assert grad_cos.min() > 0.99, (name, grad_cos)


@pytest.mark.slow
def test_short_protection_run_agrees_across_backends(models_dir, faces):
    """Same faces, seeds and config (lfsa, 5 steps): the sign steps may flip only where a gradient
    component is ~0, so the two protected batches differ in a few pixels by a few steps."""
    cfg = {**to_dict(load_option("protect", "lfsa")), "steps": 5}
    seeds = torch.arange(len(faces)) + 11
    out = {}
    for backend in ("onnx", "native"):
        ensemble = recognizers.create_many(cfg["ensemble"], models_dir, backend=backend)
        out[backend] = protect.create(cfg, ensemble)(faces, seeds)
    diff = (out["onnx"] - out["native"]).abs()
    assert diff.mean() < 1e-3 and (diff > 1 / 255).float().mean() < 0.02, (diff.mean(), diff.max())


def test_native_networks_are_fused_plain_nchw_modules(models_dir):
    for name in ("mobilefacenet_tf", "mobileface_becauseofai", "dlib_resnet"):
        net = recognizers.create(name, models_dir).network
        kinds = {type(m) for m in net.modules()}
        assert ConvAct in kinds and not kinds & {nn.BatchNorm2d, nn.BatchNorm1d}, name
        for m in net.modules():
            if isinstance(m, ConvAct) and isinstance(m.act, PReLU):
                assert m.act.weight.shape == (m.out_channels,)
        if hasattr(net, "code"):  # no layout shuffles left in the generated forward
            assert "permute" not in net.code and "transpose" not in net.code, name
    tf = recognizers.create("mobilefacenet_tf", models_dir).network
    convs = [m for m in tf.modules() if isinstance(m, ConvAct)]
    # TF's PReLU (Relu, Abs, Sub, Mul, Add) became PReLU modules; its SAME stride-2 padding stays uneven
    assert sum(isinstance(c.act, PReLU) for c in convs) == 33 and len(convs) == 52
    assert convs[0].uneven == (0, 1, 0, 1) and convs[0].padding == (0, 0)


def test_native_weights_hold_no_subnormal_numbers(models_dir):
    """faceplugin's folded weights hold thousands of subnormal floats, which x86 multiplies slowly."""
    tiny = torch.finfo(torch.float32).tiny

    def subnormals(tensors) -> int:
        return sum(int(((t.abs() > 0) & (t.abs() < tiny)).sum()) for t in tensors if t.is_floating_point())

    name = "faceplugin_mobilefacenet"
    assert subnormals(recognizers.create(name, models_dir, backend="onnx").parameters()) > 1000
    native = recognizers.create(name, models_dir).network
    assert subnormals([*native.parameters(), *native.buffers()]) == 0
    # its 1,378 channels with a zero depthwise kernel left their blocks (the embeddings are checked above)
    channels = sum(m.out_channels for m in native.modules() if isinstance(m, ConvAct))
    assert channels == 10176 - 2 * 1378, channels


def test_channels_last_key_sets_the_weights_layout_and_keeps_the_embeddings(models_dir, faces):
    """recognizer.channels_last=false keeps native weights contiguous (NCHW): on a GPU that avoids
    cuDNN's channels-last plan setup per batch shape; the embeddings stay the same."""

    def layouts(rec) -> set[bool]:
        # kernels with more than one input channel and pixel: the two layouts differ only there
        weights = [m.weight for m in rec.network.modules() if isinstance(m, ConvAct)]
        full = [w for w in weights if w.shape[1] > 1 and w.shape[2] > 1]
        return {w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in full}

    cfg = {"models_dir": str(models_dir), "backend": "native", "channels_last": False}
    (nchw,) = recognizers.from_config(["mobilefacenet_relu6"], cfg)
    (cl,) = recognizers.from_config(["mobilefacenet_relu6"], {**cfg, "channels_last": True})
    assert layouts(nchw) == {False} and layouts(cl) == {True}
    with torch.no_grad():
        cos = F.cosine_similarity(nchw(faces), cl(faces))
    assert cos.min() > 0.99999, cos


def test_backend_is_checked_and_other_models_keep_onnx2torch(models_dir):
    with pytest.raises(ConfigError, match=r"recognizer\.backend: 'tensorrt' is not one of native, onnx"):
        recognizers.create("dlib_resnet", models_dir, backend="tensorrt")
    assert set(ARCHITECTURES) == set(load_catalog(models_dir))
    rec = recognizers.create_many(["mobileface_becauseofai"], models_dir, backend="onnx")[0]
    assert not any(isinstance(m, ConvAct) for m in rec.modules())


def _graph_file(tmp_path, nodes, initializers):
    """A small opset-17 graph x (N x 3 x 16 x 16) -> y, saved as probe.onnx."""
    graph = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(v.astype(np.float32) if v.dtype.kind == "f" else v, k)
            for k, v in initializers.items()
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "probe.onnx"
    onnx.save(model, path)
    return model, path


def test_pad_batchnorm_and_prelu_fold_into_one_conv_and_gemm_into_linear(tmp_path):
    rng = np.random.default_rng(0)
    c = 8
    init = {
        "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64),
        "w": rng.normal(size=(c, 3, 3, 3)),
        "b": rng.normal(size=c),
        "gamma": rng.uniform(0.5, 2, c),
        "beta": rng.normal(size=c),
        "mean": rng.normal(size=c),
        "var": rng.uniform(0.5, 2, c),
        "slope": rng.uniform(0, 0.5, (c, 1, 1)),
        "fc": rng.normal(size=(5, c)),
        "fc_bias": rng.normal(size=5),
    }
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"]),
        helper.make_node("Conv", ["p", "w", "b"], ["c"], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("PRelu", ["bn", "slope"], ["a"]),
        helper.make_node("GlobalAveragePool", ["a"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fc_bias"], ["y"], transB=1),
    ]
    model, path = _graph_file(tmp_path, nodes, init)
    net = convert(model, path)
    convs = [m for m in net.modules() if isinstance(m, ConvAct)]
    assert len(convs) == 1 and convs[0].padding == (1, 1) and isinstance(convs[0].act, PReLU)
    assert [type(m) for m in net.children()] == [ConvAct, nn.Linear]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), _onnxruntime(path, x), atol=1e-4)


def test_channels_with_a_zero_depthwise_kernel_leave_the_block(tmp_path):
    """expand -> depthwise -> project: a channel whose depthwise kernel is zero outputs a constant,
    so it leaves all three convolutions and the projection's bias takes that constant."""
    rng = np.random.default_rng(1)
    c, dead = 8, [2, 5]
    dw = rng.normal(size=(c, 1, 3, 3))
    dw[dead] = 0.0
    dw[dead[0], 0, 1, 1] = 1e-9  # numerically zero next to kernels of size ~1
    init = {
        "we": rng.normal(size=(c, 3, 1, 1)),
        "be": rng.normal(size=c),
        "se": rng.uniform(0, 0.5, (c, 1, 1)),
        "wd": dw,
        "bd": rng.normal(size=c),
        "sd": rng.uniform(0, 0.5, (c, 1, 1)),
        "wp": rng.normal(size=(4, c, 1, 1)),
        "bp": rng.normal(size=4),
    }
    nodes = [
        helper.make_node("Conv", ["x", "we", "be"], ["e"]),
        helper.make_node("PRelu", ["e", "se"], ["ea"]),
        helper.make_node("Conv", ["ea", "wd", "bd"], ["d"], group=c, strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("PRelu", ["d", "sd"], ["da"]),
        helper.make_node("Conv", ["da", "wp", "bp"], ["p"]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["y"]),
    ]
    model, path = _graph_file(tmp_path, nodes, init)
    net = convert(model, path)
    expand, depthwise, project = (m for m in net.modules() if isinstance(m, ConvAct))
    assert (expand.out_channels, depthwise.groups, project.in_channels) == (c - 2, c - 2, c - 2)
    assert expand.act.weight.shape == depthwise.act.weight.shape == (c - 2,)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), _onnxruntime(path, x), atol=1e-4)


def test_unsupported_graphs_name_the_node(tmp_path):
    model, path = _graph_file(
        tmp_path,
        [helper.make_node("Softmax", ["x"], ["y"], name="odd_softmax", axis=1)],
        {},
    )
    with pytest.raises(
        ModelError, match=r"probe\.onnx: node 'odd_softmax' \(Softmax\): not supported.*backend=onnx"
    ):
        convert(model, path)


def test_arith_and_frozen_prelu_gradients_match_plain_pytorch():
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    prelu = PReLU(4).requires_grad_(False)
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.1, -0.5, 1.5, 0.0]))
    g = torch.randn(2, 4, 5, 5)
    (ours,) = torch.autograd.grad(prelu(x), x, g)
    (ref,) = torch.autograd.grad(F.prelu(x, prelu.weight), x, g)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.equal(Arith("sub", torch.tensor(1.5))(x), x - 1.5)
