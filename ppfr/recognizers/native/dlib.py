"""dlib's face recognition ResNet-29 (dlib_face_recognition_resnet_model_v1) as a plain module.

Its ONNX export computes padding at run time (Shape/Slice/Concat arithmetic feeding Pad nodes),
which the generic converter does not follow, so the structure is written here as dlib and
face-api.js define it; every weight still comes from the graph's Conv and MatMul nodes, read in
graph order by `conv_unit`:

- input: (x - mean) / 256 per channel (the graph's leading Sub and Div);
- stem: conv 7x7 stride 2 (no padding) + ReLU, max-pool 3x3 stride 2;
- 14 residual blocks of two 3x3 convolutions (ReLU after the first); stride-1 convolutions pad
  by 1, a block whose first convolution has stride 2 pads nothing and its shortcut is a 2x2
  average pool; dlib's add_prev adds tensors of different sizes as if the smaller were
  zero-padded at the end (channels, bottom, right), then ReLU;
- global average pool and a 256 -> 128 linear map.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppfr.errors import ModelError
from ppfr.recognizers.native.convert import ARITH, Graph, conv_unit, linear_unit
from ppfr.recognizers.native.layers import Arith, ConvAct


class Residual(nn.Module):
    def __init__(self, conv1: ConvAct, conv2: ConvAct) -> None:
        super().__init__()
        self.down = conv1.stride != (1, 1)
        for conv in (conv1, conv2):
            if conv.stride == (1, 1):
                conv.padding = (1, 1)  # the export pads these at run time
        self.conv1, self.conv2 = conv1, conv2
        self.relu = nn.ReLU()  # a module, so that boosters can hook it

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(self.conv1(x))
        if self.down:
            x = F.avg_pool2d(x, 2)
        if out.shape != x.shape:
            out, x = _pad_to(out, x), _pad_to(x, out)
        return self.relu(out + x)


def _pad_to(a: Tensor, b: Tensor) -> Tensor:
    """`a` zero-padded at the end of C, H and W wherever `b` is larger."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))
    return F.pad(a, (0, w - a.shape[3], 0, h - a.shape[2], 0, c - a.shape[1]))


class DlibResNet(nn.Module):
    def __init__(
        self, normalise: list[Arith], stem: ConvAct, blocks: list[Residual], head: nn.Linear
    ) -> None:
        super().__init__()
        self.normalise = nn.Sequential(*normalise)
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(self.stem(self.normalise(x)), 3, 2)
        return self.head(self.blocks(x).mean((2, 3)))


def dlib_resnet(model: onnx.ModelProto, path: str | Path) -> DlibResNet:
    """DlibResNet with the weights of the graph `model` (read from `path`)."""
    graph = Graph(model, path)
    normalise = []
    x = graph.inputs[0]
    while (
        (node := graph.only_consumer(x)) is not None and node.op_type in ("Sub", "Div") and node.input[0] == x
    ):
        value = graph.other_input(node, x)
        if value is None:
            break
        normalise.append(Arith(ARITH[node.op_type], torch.tensor(value, dtype=torch.float32)))
        x = node.output[0]
    convs = [conv_unit(graph, n)[0] for n in graph.nodes if n.op_type == "Conv"]
    heads = [n for n in graph.nodes if n.op_type == "MatMul"]
    if len(normalise) != 2 or len(convs) != 29 or len(heads) != 1:
        raise ModelError(
            f"{path}: not dlib's ResNet-29 (expected Sub and Div on the input, 29 Conv and 1 MatMul; "
            f"got {len(normalise)} input ops, {len(convs)} Conv, {len(heads)} MatMul)"
        )
    blocks = [Residual(a, b) for a, b in zip(convs[1::2], convs[2::2], strict=True)]
    return DlibResNet(normalise, convs[0], blocks, linear_unit(graph, heads[0], None)[0])
