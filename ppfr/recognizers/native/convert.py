"""ONNX graph -> plain PyTorch modules, with the exported graph's many small nodes fused away.

The shared recognizers are exported from TensorFlow, TF.js, MXNet and PyTorch; their graphs
spell one layer as up to eight nodes (PReLU as Relu/Abs/Sub/Mul/Add or Min/Max/Mul/Add, ReLU6
as Relu/Min/Max, BatchNorm as Mul/Add, padding as a separate Pad, a flatten as
Transpose/Reshape). `conv_unit` reads one Conv node with everything that belongs to it and
returns one `ConvAct`: weights and biases come from the file, BatchNorm and per-channel affine
maps are folded into them, PReLU slopes become parameters. `convert` turns a whole graph made of
such units, residual Adds, global pooling, a flatten and a linear head into a `torch.fx`
GraphModule: plain NCHW code (`print(net.code)` shows it) with no layout shuffles.

Anything else is a ModelError naming the node: such graphs stay with onnx2torch.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from ppfr.errors import ModelError
from ppfr.recognizers.native.layers import Arith, ConvAct

ARITH = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


class Graph:
    """An ONNX graph with what the converter asks of it: constants, producers, consumers, shapes."""

    def __init__(self, model: onnx.ModelProto, path: str | Path) -> None:
        self.path = str(path)
        graph = model.graph
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                attr = node.attribute[0]
                value = onnx.helper.get_attribute_value(attr)
                self.constants[node.output[0]] = (
                    numpy_helper.to_array(value) if attr.name == "value" else np.asarray(value)
                )
        self.nodes = [n for n in graph.node if n.op_type != "Constant"]
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        inferred = onnx.shape_inference.infer_shapes(model).graph
        self.shapes = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.value_info, *inferred.input, *inferred.output]
        }
        self.inputs = [i.name for i in graph.input if i.name not in self.constants]
        self.outputs = [o.name for o in graph.output]

    def error(self, node: onnx.NodeProto, problem: str) -> ModelError:
        return ModelError(f"{self.path}: node {node.name!r} ({node.op_type}): {problem}")

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def other_input(self, node: onnx.NodeProto, name: str) -> np.ndarray | None:
        """The constant operand of a binary node whose other operand is `name`."""
        others = [i for i in node.input if i != name]
        return self.const(others[0]) if len(others) == 1 else None


def attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def per_channel(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A constant that acts per channel on NCHW (scalar, [C,1,1] or [1,C,1,1]) as a length-C vector."""
    if value is None or value.size not in (1, channels):
        return None
    if value.size > 1 and (value.ndim < 3 or value.shape[-2:] != (1, 1)):
        return None  # e.g. shape [C] broadcasts over W, not C
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))


def scalar(value: np.ndarray | None) -> float | None:
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def zero_pads(graph: Graph, pad: onnx.NodeProto) -> list[int] | None:
    """(top, left, bottom, right) of a constant zero Pad on H and W only; None otherwise."""
    a = attrs(pad)
    amounts = graph.const(pad.input[1]) if len(pad.input) > 1 else np.asarray(a.get("pads"))
    fill = graph.const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
    if amounts is None or fill is None or a.get("mode", b"constant") not in (b"constant", "constant"):
        return None
    n0, c0, t, left, n1, c1, b, r = (int(v) for v in amounts.reshape(-1))
    if n0 or c0 or n1 or c1 or float(fill.reshape(-1)[0]) != 0:
        return None
    return [t, left, b, r]


def conv_unit(graph: Graph, conv: onnx.NodeProto) -> tuple[ConvAct, str, str, list[onnx.NodeProto]]:
    """One Conv node with its zero Pad, the affine maps after it and its activation.

    Returns the module, the names of its input and output tensors and the nodes it stands for.
    """
    a = attrs(conv)
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or any(
        d != 1 for d in a.get("dilations", [1])
    ):
        raise graph.error(conv, "auto_pad and dilation are not supported")
    w = graph.const(conv.input[1])
    if w is None or w.ndim != 4:
        raise graph.error(conv, "weights must be a constant 2-D convolution kernel")
    w = w.astype(np.float64)
    channels = w.shape[0]
    b = (
        graph.const(conv.input[2]).astype(np.float64)
        if len(conv.input) > 2 and conv.input[2]
        else np.zeros(channels)
    )
    pads = list(a.get("pads", [0, 0, 0, 0]))
    used = [conv]
    src = conv.input[0]
    pad = graph.producer.get(src)
    if pad is not None and pad.op_type == "Pad" and graph.only_consumer(src) is conv:
        extra = zero_pads(graph, pad)
        if extra is not None:
            pads = [p + e for p, e in zip(pads, extra, strict=True)]
            src = pad.input[0]
            used.append(pad)

    out = conv.output[0]
    while (nxt := graph.only_consumer(out)) is not None:
        if nxt.op_type == "BatchNormalization":
            gamma, beta, mean, var = (graph.const(i) for i in nxt.input[1:5])
            if any(v is None for v in (gamma, beta, mean, var)):
                raise graph.error(nxt, "BatchNorm statistics must be constants")
            s = gamma / np.sqrt(var.astype(np.float64) + attrs(nxt).get("epsilon", 1e-5))
            w, b = w * s[:, None, None, None], (b - mean) * s + beta
        elif nxt.op_type in ARITH and nxt.input[0] == out or nxt.op_type in ("Add", "Mul"):
            c = per_channel(graph.other_input(nxt, out), channels)
            if c is None:
                break
            if nxt.op_type == "Mul":
                w, b = w * c[:, None, None, None], b * c
            elif nxt.op_type == "Div":
                w, b = w / c[:, None, None, None], b / c
            else:
                b = b + c if nxt.op_type == "Add" else b - c
        else:
            break
        used.append(nxt)
        out = nxt.output[0]

    kind, slope, out, act_nodes = activation(graph, out, channels)
    module = ConvAct(
        torch.tensor(w, dtype=torch.float32),
        torch.tensor(b, dtype=torch.float32),
        stride=tuple(a.get("strides", [1, 1])),
        pads=tuple(pads),
        groups=int(a.get("group", 1)),
        act=kind,
        slope=None if slope is None else torch.tensor(slope, dtype=torch.float32),
    )
    return module, src, out, used + act_nodes


def activation(graph: Graph, x: str, channels: int) -> tuple[str | None, np.ndarray | None, str, list]:
    """The activation applied to tensor `x`, in the spellings the shared exports use.

    Returns (kind, PReLU slopes, output tensor, its nodes); (None, None, x, []) when there is none.
    """
    users = graph.consumers.get(x, [])
    ops = sorted(n.op_type for n in users)
    by_op = {n.op_type: n for n in users}
    if ops == ["Relu"]:
        relu = users[0]
        lo = graph.only_consumer(relu.output[0])  # ReLU then min(., 6), max(., 0): ReLU6
        hi = lo and graph.only_consumer(lo.output[0])
        if (
            lo is not None
            and hi is not None
            and lo.op_type == "Min"
            and hi.op_type == "Max"
            and scalar(graph.other_input(lo, relu.output[0])) == 6
            and scalar(graph.other_input(hi, lo.output[0])) == 0
        ):
            return "relu6", None, hi.output[0], [relu, lo, hi]
        return "relu", None, relu.output[0], [relu]
    if ops == ["Clip"]:
        clip = users[0]
        bounds = [scalar(graph.const(i)) if i else None for i in clip.input[1:3]]
        bounds += [None] * (2 - len(bounds))
        a = attrs(clip)  # opset < 11 keeps the bounds as attributes
        lo = bounds[0] if bounds[0] is not None else a.get("min")
        hi = bounds[1] if bounds[1] is not None else a.get("max")
        if lo == 0 and hi == 6:
            return "relu6", None, clip.output[0], [clip]
        if lo == 0 and hi is None:
            return "relu", None, clip.output[0], [clip]
    if ops == ["PRelu"]:
        prelu = users[0]
        slope = per_channel(graph.const(prelu.input[1]), channels)
        if slope is not None and prelu.input[0] == x:
            return "prelu", slope, prelu.output[0], [prelu]
    if ops == ["Abs", "Relu", "Sub"]:  # TensorFlow: relu(x) + c * (x - |x|), c = slope / 2
        relu, ab, sub = by_op["Relu"], by_op["Abs"], by_op["Sub"]
        mul = graph.only_consumer(sub.output[0])
        add = mul and graph.only_consumer(mul.output[0])
        if (
            list(sub.input) == [x, ab.output[0]]
            and mul is not None
            and add is not None
            and mul.op_type == "Mul"
            and add.op_type == "Add"
            and set(add.input) == {relu.output[0], mul.output[0]}
            and graph.only_consumer(relu.output[0]) is add
            and (c := per_channel(graph.other_input(mul, sub.output[0]), channels)) is not None
        ):
            return "prelu", 2 * c, add.output[0], [relu, ab, sub, mul, add]
    if ops == ["Max", "Min"]:  # TF.js: max(0, x) + slope * min(0, x)
        hi, lo = by_op["Max"], by_op["Min"]
        mul = graph.only_consumer(lo.output[0])
        add = mul and graph.only_consumer(mul.output[0])
        if (
            scalar(graph.other_input(lo, x)) == 0
            and scalar(graph.other_input(hi, x)) == 0
            and mul is not None
            and add is not None
            and mul.op_type == "Mul"
            and add.op_type == "Add"
            and set(add.input) == {hi.output[0], mul.output[0]}
            and graph.only_consumer(hi.output[0]) is add
            and (slope := per_channel(graph.other_input(mul, lo.output[0]), channels)) is not None
        ):
            return "prelu", slope, add.output[0], [hi, lo, mul, add]
    return None, None, x, []


def linear_unit(
    graph: Graph, node: onnx.NodeProto, nhwc: tuple[int, int, int] | None
) -> tuple[nn.Linear, str, list[onnx.NodeProto]]:
    """MatMul or Gemm with a constant weight, and the per-feature affine map after it (a BatchNorm1d).

    `nhwc`: (C, H, W) when the input was flattened channels-last, which the weight rows absorb.
    """
    a = attrs(node)
    w = graph.const(node.input[1])
    if (
        w is None
        or w.ndim != 2
        or a.get("transA", 0)
        or node.op_type == "Gemm"
        and a.get("alpha", 1.0) != 1.0
    ):
        raise graph.error(node, "only x @ W (+ b) with a constant 2-D W is supported")
    w = (w.T if node.op_type == "Gemm" and a.get("transB", 0) else w).astype(np.float64)  # in x out
    b = np.zeros(w.shape[1])
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        b = graph.const(node.input[2]).astype(np.float64).reshape(-1) * a.get("beta", 1.0)
    if nhwc is not None:
        c, h, wd = nhwc
        w = w.reshape(h, wd, c, -1).transpose(2, 0, 1, 3).reshape(c * h * wd, -1)
    used = [node]
    out = node.output[0]
    while (nxt := graph.only_consumer(out)) is not None and nxt.op_type in ("Mul", "Add"):
        c = graph.other_input(nxt, out)
        if c is None or c.size not in (1, w.shape[1]):
            break
        c = np.broadcast_to(c.reshape(-1).astype(np.float64), (w.shape[1],))
        w, b = (w * c, b * c) if nxt.op_type == "Mul" else (w, b + c)
        used.append(nxt)
        out = nxt.output[0]
    linear = nn.Linear(*w.shape)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(w.T))
        linear.bias.copy_(torch.tensor(b))
    return linear, out, used


def _rank(graph: Graph, shape_input: str) -> int | None:
    """Length of a Reshape's target shape, constant or computed."""
    const = graph.const(shape_input)
    if const is not None:
        return int(const.size)
    dims = graph.shapes.get(shape_input)
    return dims[0] if dims and len(dims) == 1 else None


def convert(model: onnx.ModelProto, path: str | Path) -> fx.GraphModule:
    """The whole graph as plain modules: ConvAct units, residual adds, pooling, flatten, Linear head."""
    graph = Graph(model, path)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ModelError(f"{path}: expected one input and one output, got {graph.inputs} -> {graph.outputs}")
    code = fx.Graph()
    modules: dict[str, nn.Module] = {}
    env: dict[str, fx.Node] = {graph.inputs[0]: code.placeholder("x")}
    shape_values: set[str] = set()  # outputs of shape arithmetic (Shape, Gather, Concat, ...)
    nhwc: dict[str, tuple[int, int, int]] = {}  # flattened channels-last tensors: their (C, H, W)
    done: set[int] = set()

    def add_module(prefix: str, module: nn.Module, source: str) -> fx.Node:
        name = f"{prefix}{sum(k.startswith(prefix) for k in modules)}"
        modules[name] = module
        return code.call_module(name, (env[source],))

    def absorb(nodes: Iterable[onnx.NodeProto]) -> None:
        done.update(id(n) for n in nodes)

    for node in graph.nodes:
        if id(node) in done:
            continue
        op, out = node.op_type, node.output[0]
        data = [i for i in node.input if i in env]
        if op == "Conv":  # first: its input may be a Pad that it merges
            unit, source, out, used = conv_unit(graph, node)
            env[out] = add_module("conv", unit, source)
            absorb(used)
        elif op == "Shape" or not data:
            if op != "Shape" and any(
                i and i not in graph.constants and i not in shape_values for i in node.input
            ):
                raise graph.error(node, "an input is neither data, a constant nor shape arithmetic")
            shape_values.update(node.output)
        elif (
            op == "Pad"
            and getattr(graph.only_consumer(out), "op_type", None) == "Conv"
            and zero_pads(graph, node) is not None
        ):
            continue  # conv_unit merges it into the Conv's own padding
        elif op == "Add" and len(data) == 2:
            env[out] = code.call_function(operator.add, (env[data[0]], env[data[1]]))
        elif (
            op in ARITH
            and len(data) == 1
            and node.input[0] == data[0]
            and (c := graph.other_input(node, data[0])) is not None
        ):
            env[out] = add_module("arith", Arith(ARITH[op], torch.tensor(c, dtype=torch.float32)), data[0])
        elif (
            op == "GlobalAveragePool" or op == "ReduceMean" and sorted(attrs(node).get("axes", [])) == [2, 3]
        ):
            keep = op == "GlobalAveragePool" or bool(attrs(node).get("keepdims", 1))
            env[out] = code.call_method("mean", (env[data[0]], (2, 3)), {"keepdim": keep})
        elif op in ("Reshape", "Flatten", "Squeeze"):
            env[out] = flatten_or_keep(graph, node, env[data[0]], code)
        elif op == "Transpose" and attrs(node).get("perm") == [0, 2, 3, 1]:
            reshape = graph.only_consumer(out)  # NHWC then flatten: fold the order into the Linear after it
            dims = graph.shapes.get(data[0])
            if (
                reshape is None
                or reshape.op_type != "Reshape"
                or _rank(graph, reshape.input[1]) != 2
                or not dims
                or None in dims[1:]
            ):
                raise graph.error(
                    node, "a transpose is supported only right before a flatten and a linear layer"
                )
            env[reshape.output[0]] = code.call_function(torch.flatten, (env[data[0]], 1))
            nhwc[reshape.output[0]] = tuple(dims[1:])
            absorb([reshape])
        elif op in ("MatMul", "Gemm"):
            linear, out, used = linear_unit(graph, node, nhwc.get(data[0]))
            env[out] = add_module("linear", linear, data[0])
            absorb(used)
        else:
            raise graph.error(
                node, "not supported by the native converter (recognizer.backend=onnx runs any graph)"
            )
    if graph.outputs[0] not in env:
        raise ModelError(f"{path}: the output {graph.outputs[0]!r} is not computed from the input")
    code.output(env[graph.outputs[0]])
    return drop_dead_channels(fx.GraphModule(modules, code, class_name="NativeNetwork"))


def drop_dead_channels(net: fx.GraphModule, rel: float = 1e-6) -> fx.GraphModule:
    """Remove the channels of inverted-residual blocks whose depthwise kernel is (numerically) zero.

    Why: such a channel's depthwise output is its activated bias whatever the input, so the
    expansion computes it for nothing and the projection only adds a constant.
    faceplugin_mobilefacenet's training left 1,378 of its 4,032 depthwise channels so (up to 67 %
    in its 14 x 14 blocks), their kernels below 5e-8 against about 0.5 for the live ones.
    Pattern: conv (groups 1, used only by) -> depthwise -> 1x1 conv without padding; the dead
    channels go from all three and the projection's bias takes their constant.
    """
    mods = dict(net.named_modules())
    for node in net.graph.nodes:
        dw = mods.get(node.target) if node.op == "call_module" else None
        if (
            not isinstance(dw, ConvAct)
            or dw.groups == 1
            or not dw.groups == dw.in_channels == dw.out_channels
        ):
            continue
        src, users = node.args[0], list(node.users)
        expand = mods.get(src.target) if getattr(src, "op", None) == "call_module" else None
        project = mods.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if (
            not isinstance(expand, ConvAct)
            or expand.groups != 1
            or len(src.users) != 1
            or not isinstance(project, ConvAct)
            or project.groups != 1
            or project.kernel_size != (1, 1)
            or project.padding != (0, 0)
            or project.uneven is not None
        ):
            continue
        size = dw.weight.detach().abs().flatten(1).amax(1)
        dead = size <= rel * size.max()
        if not dead.any() or dead.all():
            continue
        keep = ~dead
        with torch.no_grad():
            constant = dw.act(dw.bias.view(1, -1, 1, 1)).view(-1)  # each channel's output, input aside
            project.bias += project.weight[:, dead, 0, 0] @ constant[dead]
            expand.keep(out=keep)
            dw.keep(out=keep)
            project.keep(inp=keep)
    return net


def flatten_or_keep(graph: Graph, node: onnx.NodeProto, x: fx.Node, code: fx.Graph) -> fx.Node:
    """A reshape to B x features is a flatten; one to B x C x 1 x 1 of a B x C x 1 x 1 tensor does nothing."""
    if node.op_type == "Reshape":
        rank = _rank(graph, node.input[1])
    elif node.op_type == "Flatten":
        rank = 2 if attrs(node).get("axis", 1) == 1 else None
    else:  # Squeeze of the 1 x 1 spatial axes
        axes = graph.const(node.input[1]) if len(node.input) > 1 else np.asarray(attrs(node).get("axes", []))
        rank = 2 if axes is not None and sorted(axes.reshape(-1).tolist()) == [2, 3] else None
    dims = graph.shapes.get(node.input[0])
    if rank == 2:
        return code.call_function(torch.flatten, (x, 1))
    if rank == 4 and dims and dims[2:] == [1, 1] and graph.shapes.get(node.output[0], [None])[1:] == dims[1:]:
        return x
    raise graph.error(node, "only a flatten to B x features (or a reshape that changes nothing) is supported")
