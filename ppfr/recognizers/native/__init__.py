"""Native PyTorch networks for the shared ONNX recognizers, weights read from the ONNX files.

`convert` turns the plain convolutional graphs (the MobileFaceNet family, MobileFace, the HSE
MobileNet) into fused modules; dlib's ResNet, whose export computes its padding at run time,
has its own module. Only the architectures listed here were checked against onnxruntime
(tests/test_native.py); any other ONNX model runs through onnx2torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
from torch import nn

from ppfr.recognizers.native.convert import convert
from ppfr.recognizers.native.dlib import dlib_resnet

__all__ = ["ARCHITECTURES", "convert", "dlib_resnet"]

# models.json name -> builder(graph, path): the shared models whose native module matches onnxruntime.
ARCHITECTURES: dict[str, Callable[[onnx.ModelProto, str | Path], nn.Module]] = {
    "mobilefacenet_tf": convert,
    "faceplugin_mobilefacenet": convert,
    "mobilefacenet_relu6": convert,
    "mobileface_becauseofai": convert,
    "hse_faceres": convert,
    "hse_faceres_deep": convert,
    "dlib_resnet": dlib_resnet,
}
