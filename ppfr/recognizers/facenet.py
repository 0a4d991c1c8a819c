"""facenet-pytorch InceptionResnetV1 (VGGFace2 or CASIA-WebFace weight files users already have).

Geometry. These networks were trained and evaluated on MTCNN *box* crops, not on a landmark
template: facenet-pytorch cuts the box (plus a margin) and resizes it to 160x160, which
squeezes the face vertically, since MTCNN boxes are taller than wide. We reproduce that
average geometry with one fixed affine map from the ArcFace-112 crop: the mean facenet-pytorch
MTCNN box in ArcFace-112 coordinates, measured on 450 faces of faces-mini/lfw (centre
(54.19, 64.28), 78.55 wide, 104.35 high; aspect 1.33), with the 14-pixel margin (out of 160)
of facenet-pytorch's own LFW evaluation. The frame reaches y = 121 in crop pixels, past the
bottom of the 112 crop, so the last ~13 rows of the 160x160 input (below the chin) are zero.
Values: (255 x - 127.5) / 128 (facenet-pytorch's `fixed_image_standardization`), RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from facenet_pytorch import InceptionResnetV1

from ppfr.recognizers.base import RECOGNIZERS, Recognizer, file_sha256, fit_state_dict, load_checkpoint

INPUT = 160
MARGIN = 14.0
BOX_CENTRE = (54.19, 64.28)  # mean MTCNN box in ArcFace-112 crop pixels (see module docstring)
BOX_SIZE = (78.55, 104.35)  # width, height


def box_affine() -> np.ndarray:
    """2x3 map from ArcFace-112 crop pixels to the 160x160 input: the mean box plus margin fills it."""
    sx, sy = ((INPUT - MARGIN) / s for s in BOX_SIZE)
    centre = (INPUT - 1) / 2
    return np.array([[sx, 0, centre - sx * BOX_CENTRE[0]], [0, sy, centre - sy * BOX_CENTRE[1]]])


@RECOGNIZERS.register("facenet")
def create_facenet(name: str, weights: str | Path) -> Recognizer:
    """InceptionResnetV1 from a facenet-pytorch state dict (its classification head is dropped)."""
    state = {k: v for k, v in load_checkpoint(weights).items() if not k.startswith("logits.")}
    network = InceptionResnetV1(pretrained=None, classify=False)
    fit_state_dict(network, state, weights)
    return Recognizer(
        name,
        network,
        512,
        input_size=(INPUT, INPUT),
        affine=box_affine(),
        mean=(127.5, 127.5, 127.5),
        std=(128.0, 128.0, 128.0),
        sha256=file_sha256(weights),
    )
