"""PartialFace (Mi et al., ICCV'23; Tencent/TFace ``recognition/tasks/partialface``, reference.md 1.1).

The face is kept only as a random subset of its mid/high-frequency DCT channels: prune the 10
lowest basis functions (row + col <= 3) of Y, Cb and Cr, split the 54 left per colour into 6 fixed
subsets of 9, and give each face one subset (the same 9 basis functions in all three colours,
27 channels) under one of 3 fixed channel permutations.

TFace hard-codes its 6 x 9 subset matrix and its 3 permutations; we cannot see them, so ours are
generated from the description: the 54 basis functions, ordered by frequency (row + col, then
row), are dealt round-robin into the 6 subsets, so each subset spans the same range of
frequencies; the permutations are the identity, the reversal and the stride-2 interleave
(i -> 2i mod 9) of the 9 channels.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ppfr.errors import DataError
from ppfr.protect import dct, parts
from ppfr.protect.base import METHODS, check_batch

PRUNED = (0, 1, 2, 3, 8, 9, 10, 16, 17, 24)  # basis row*8 + col with row + col <= 3
KEPT = tuple(sorted(set(range(dct.BASIS)) - set(PRUNED), key=lambda k: (k // 8 + k % 8, k // 8)))
SUBSETS = tuple(KEPT[i::6] for i in range(6))  # 6 x 9, disjoint, covering KEPT
PERMUTATIONS = (tuple(range(9)), tuple(range(8, -1, -1)), tuple(2 * i % 9 for i in range(9)))
TRIPLES = tuple(itertools.combinations(range(len(SUBSETS)), 3))  # identity label % 20 -> allowed subsets


def _index_table() -> Tensor:
    """6 x 3 x 27 long: the 192-channel indices of subset s under permutation p, colour-major."""
    table = [
        [dct.channels([SUBSETS[s][i] for i in perm]) for perm in PERMUTATIONS] for s in range(len(SUBSETS))
    ]
    return torch.tensor(table, dtype=torch.long)


@METHODS.register("partialface")
class PartialFace(dct.FrequencyMethod):
    """represent: the permuted 27-channel subset (raw DCT coefficients, as TFace's IR-18 gets them);
    forward: the zero-filled inverse DCT of that subset, 3 x H x W in [0,1], each image stretched to
    [0,1] (``visible: stretched``) or clamped as TFace does (``raw``: near-flat grey, see ppfr.protect.dct);
    attacker_input: the 27 channels (``attacker_input: channels``, faithful) or that image (``image``).

    Stochastic: the subset and permutation come from each face's seed. Without labels (protection
    time) any of the 6 subsets may be drawn; with labels (training a recognizer on the
    representation) only the 3 of the triple ``label % 20`` (TFace ``form_training_batch``).
    """

    name = "partialface"
    stochastic = True

    def __init__(self, visible: str = "stretched", attacker_input: str = "channels") -> None:
        super().__init__(visible, attacker_input, 3 * len(SUBSETS[0]))
        self.register_buffer("index_table", _index_table(), persistent=False)

    def choose(self, seeds: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per item (subset, permutation) indices, drawn from its seed."""
        u = parts.uniform(parts.generators(seeds, "cpu"), 2, "cpu")
        perm = (u[:, 1] * len(PERMUTATIONS)).long()
        if labels is None:
            return (u[:, 0] * len(SUBSETS)).long(), perm
        if labels.shape != seeds.shape:
            raise DataError(f"{self.name}: expected one label per seed, got {tuple(labels.shape)}")
        allowed = torch.tensor(TRIPLES)[labels.cpu().long() % len(TRIPLES)]  # B x 3
        return allowed.gather(1, (u[:, :1] * 3).long()).squeeze(1), perm

    def channel_index(self, seeds: Tensor, labels: Tensor | None = None) -> Tensor:
        """B x 27: which of the 192 DCT channels each item keeps, in its permuted order."""
        subset, perm = self.choose(seeds, labels)
        return self.index_table[subset.to(self.index_table.device), perm.to(self.index_table.device)]

    def represent(self, x: Tensor, seeds: Tensor, labels: Tensor | None = None) -> Tensor:
        check_batch(x, seeds, self.name)
        index = self.channel_index(seeds, labels).to(x.device)
        return dct.select(dct.to_dct(x), index)

    def forward(self, x: Tensor, seeds: Tensor) -> Tensor:
        check_batch(x, seeds, self.name)
        index = self.channel_index(seeds).to(x.device)
        kept = dct.select(dct.to_dct(x), index)
        return dct.from_dct(dct.zero_filled(kept, index), self.stretch).to(x.dtype)
