"""DuetFace (Mi et al., ACM MM'22; Tencent/TFace ``recognition/tasks/duetface``, reference.md 1.1).

The 192 DCT channels are split: the 10 lowest basis functions per colour (``SUB_CHS``, 30
channels) stay on the client, the server sees the other 162. The protection is that split, so it
is deterministic and needs no training; DuetFace's learned parts are its two recognizers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ppfr.protect import dct
from ppfr.protect.base import METHODS, check_batch

CLIENT_BASIS = (0, 1, 2, 3, 4, 5, 8, 9, 16, 24)  # TFace SUB_CHS: differs from PartialFace's pruned set
CLIENT = tuple(dct.channels(CLIENT_BASIS))  # 30
SERVER = tuple(sorted(set(range(dct.CHANNELS)) - set(CLIENT)))  # 162


@METHODS.register("duetface")
class DuetFace(dct.FrequencyMethod):
    """represent: the server's 162 high-frequency channels (raw DCT coefficients); forward: the inverse
    DCT with the 30 client channels zeroed, 3 x H x W in [0,1], each image stretched to [0,1]
    (``visible: stretched``) or clamped as TFace does (``raw``: near-flat grey, see ppfr.protect.dct);
    attacker_input: the 162 channels (``attacker_input: channels``, faithful) or that image (``image``)."""

    name = "duetface"

    def __init__(self, visible: str = "stretched", attacker_input: str = "channels") -> None:
        super().__init__(visible, attacker_input, len(SERVER))
        self.register_buffer("server", torch.tensor(SERVER, dtype=torch.long), persistent=False)

    def represent(self, x: Tensor, seeds: Tensor) -> Tensor:
        check_batch(x, seeds, self.name)
        return dct.to_dct(x).index_select(1, self.server.to(x.device))

    def forward(self, x: Tensor, seeds: Tensor) -> Tensor:
        check_batch(x, seeds, self.name)
        coef = dct.to_dct(x)
        coef[:, list(CLIENT)] = 0
        return dct.from_dct(coef, self.stretch).to(x.dtype)
