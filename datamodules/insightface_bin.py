"""insightface ``.bin`` verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, calfw.bin, ...).

A pickle of ``(bins, issame)``: 2N encoded images of already aligned 112x112 faces and N
booleans; pair i is (bins[2i], bins[2i+1]); folds are 10 consecutive blocks of pair order, as
``KFold(n_splits=10, shuffle=False)`` in insightface's ``verification.py``. ``root`` is the .bin
file itself. The format carries no identities: every label is -1 (``base.NO_IDENTITY``), so
``subset.identities`` selects nothing useful here. No detection runs; crops are decoded as stored.
The file is a pickle, so load only .bin files from a source you trust.
"""

from __future__ import annotations

import pickle

import numpy as np

from ppfr.errors import DataError

from .base import DATAMODULES, FaceDataModule, Pair, Record

N_FOLDS = 10


@DATAMODULES.register("bin")
class BinDataModule(FaceDataModule):
    dataset_name = "bin"

    def scan(self) -> tuple[list[Record], list[Pair]]:
        path = self.root
        if not path.is_file():
            raise DataError(f"{path}: .bin file not found (root must be the .bin file itself)")
        try:
            with open(path, "rb") as f:
                bins, issame = pickle.load(f, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise DataError(
                f"{path}: not an insightface .bin (a pickled (bins, issame) pair): {err}"
            ) from err
        if len(bins) != 2 * len(issame):
            raise DataError(f"{path}: {len(bins)} images but {len(issame)} pair labels (need 2 per pair)")
        records = []
        for i, data in enumerate(bins):
            data = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)  # arrays in some packs
            records.append(Record(data, None, f"{i:06d}"))
        folds = np.zeros(len(issame), dtype=int)
        for k, block in enumerate(np.array_split(np.arange(len(issame)), N_FOLDS)):
            folds[block] = k
        pairs = [Pair(2 * i, 2 * i + 1, bool(same), int(folds[i])) for i, same in enumerate(issame)]
        return records, pairs
