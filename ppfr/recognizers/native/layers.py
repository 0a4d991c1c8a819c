"""The few plain modules the native networks are made of.

Each stands for what an exported graph spells as several nodes: a convolution with its
BatchNorm or per-channel scale folded in, its (possibly uneven) zero padding and its activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def activation(kind: str | None, slope: Tensor | None = None) -> nn.Module:
    """relu, relu6, prelu (per-channel slopes) or None (linear)."""
    if kind is None:
        return nn.Identity()
    if kind == "relu":
        return nn.ReLU()
    if kind == "relu6":
        return nn.ReLU6()
    if kind == "prelu":
        if slope is None:
            raise ValueError("prelu needs its slopes")
        prelu = PReLU(len(slope))
        with torch.no_grad():
            prelu.weight.copy_(slope)
        return prelu
    raise ValueError(f"unknown activation {kind!r}")


class PReLU(nn.PReLU):
    """nn.PReLU whose backward skips the slopes' gradient while they are frozen.

    aten's PReLU backward always computes both gradients; on CPU it cost 3-8x its forward and
    most of a MobileFaceNet's backward pass. With frozen slopes the input gradient alone is
    g * (1 if x > 0 else slope): two memory-bound passes (threshold_backward, lerp).
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad:
            return super().forward(x)
        return _FrozenPReLU.apply(x, self.weight)


class _FrozenPReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, slope: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, slope)
        return F.prelu(x, slope)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        x, slope = ctx.saved_tensors
        positive = torch.ops.aten.threshold_backward(grad, x, 0.0)  # grad where x > 0, else 0
        # positive + slope * (grad - positive): grad where x > 0, slope * grad elsewhere
        slope = slope.to(grad.dtype).view(1, -1, *([1] * (grad.ndim - 2)))  # bf16 autocast: grad is bf16
        return torch.lerp(positive, grad, slope), None


class ConvAct(nn.Conv2d):
    """Conv2d + activation, with the graph's folded weights.

    `pads` is (top, left, bottom, right) as ONNX writes them: TensorFlow's SAME padding of a
    stride-2 convolution on an even size is uneven (0 before, 1 after), which Conv2d cannot
    express, so that case alone pads explicitly first.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor,
        stride: tuple[int, int],
        pads: tuple[int, int, int, int],
        groups: int,
        act: str | None = None,
        slope: Tensor | None = None,
    ) -> None:
        out_channels, per_group, kh, kw = weight.shape
        top, left, bottom, right = pads
        even = top == bottom and left == right
        super().__init__(
            per_group * groups,
            out_channels,
            (kh, kw),
            stride=stride,
            padding=(top, left) if even else 0,
            groups=groups,
        )
        self.uneven = None if even else (left, right, top, bottom)  # F.pad order
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(bias)
        self.act = activation(act, slope)

    def keep(self, out: Tensor | None = None, inp: Tensor | None = None) -> None:
        """Keep only the output channels `out` and input channels `inp` (boolean masks), in place.

        A depthwise convolution's input channels are its output channels: give it `out` only."""
        trainable = self.weight.requires_grad  # indexing under no_grad would drop the flag
        with torch.no_grad():
            w, b = self.weight, self.bias
            if out is not None:
                w, b = w[out], b[out]
                if isinstance(self.act, nn.PReLU):
                    slope = self.act.weight
                    self.act.weight = nn.Parameter(slope[out], slope.requires_grad)
                    self.act.num_parameters = int(out.sum())
            if inp is not None and self.groups == 1:
                w = w[:, inp]
            self.weight, self.bias = nn.Parameter(w.clone(), trainable), nn.Parameter(b.clone(), trainable)
        if self.groups > 1:  # depthwise: its channels are its groups
            self.groups = w.shape[0]
        self.out_channels, self.in_channels = w.shape[0], w.shape[1] * self.groups

    def forward(self, x: Tensor) -> Tensor:
        if self.uneven is not None:
            x = F.pad(x, self.uneven)
        return self.act(super().forward(x))


class Arith(nn.Module):
    """`x <op> constant` for the in-graph input normalisation ((x - mean) / std)."""

    def __init__(self, op: str, value: Tensor) -> None:
        super().__init__()
        self.op = op
        self.register_buffer("value", value)

    def forward(self, x: Tensor) -> Tensor:
        return getattr(torch, self.op)(x, self.value)

    def extra_repr(self) -> str:
        return f"{self.op}, shape={tuple(self.value.shape)}"
