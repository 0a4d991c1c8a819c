"""The one interface every recognizer offers: aligned ArcFace-112 crops in, unit embeddings out.

Each wrapper owns its preprocessing, so callers (the protection method, the evaluation) never
need to know a model's input size, alignment, channel order or value range, and gradients
flow from the embedding back to the shared 112x112 crop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ppfr.errors import ModelError
from ppfr.registry import Registry
from ppfr.template import ARCFACE_112, similarity_transform

CROP_SIZE = 112  # the datamodules' crops: ArcFace 5-point template, 112x112

_hashes: dict[tuple[str, int, int], str] = {}  # (path, mtime_ns, size) -> sha256, per process


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, computed once per (path, mtime, size) in this process."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def _pixel_to_normalised(size: tuple[int, int]) -> np.ndarray:
    """3x3 map from pixel coordinates (pixel centres at integers, as in cv2 and the landmarks)
    to grid_sample's normalised coordinates with align_corners=False."""
    h, w = size
    return np.array([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])


def warp_theta(affine: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
    """`F.affine_grid` theta for a 2x3 map from crop pixels to network-input pixels.

    affine_grid asks, for each output pixel, where to sample the input: so the map is inverted
    and conjugated into normalised coordinates.
    """
    forward = np.vstack([np.asarray(affine, dtype=np.float64), [0, 0, 1]])
    theta = _pixel_to_normalised((CROP_SIZE, CROP_SIZE)) @ np.linalg.inv(forward)
    theta = theta @ np.linalg.inv(_pixel_to_normalised(input_size))
    return torch.tensor(theta[:2], dtype=torch.float32)


def affine_from_points(points_xy: Sequence[Sequence[float]]) -> np.ndarray:
    """Similarity map from the ArcFace-112 template onto a model's own five alignment points."""
    return similarity_transform(ARCFACE_112, np.asarray(points_xy, dtype=np.float32)).astype(np.float64)


class Recognizer(nn.Module):
    """A frozen face recognizer behind a differentiable, self-contained preprocessing.

    `forward(x)`: x is B x 3 x 112 x 112 RGB in [0, 1] on the ArcFace template; returns
    B x embedding_dim float32 unit vectors. Preprocessing, in order: warp to the model's own
    geometry (skipped when identical), channel order, then `(255 * x - mean) / std` per channel
    of the network's input order. `family` groups siblings (fine-tuned variants of one model),
    which never count as independent black boxes. `sha256` is the weight file's hash: what
    calibrated thresholds and resumed runs are keyed on, whichever backend runs the network.
    """

    def __init__(
        self,
        name: str,
        network: nn.Module,
        embedding_dim: int,
        family: str | None = None,
        input_size: tuple[int, int] = (CROP_SIZE, CROP_SIZE),
        affine: np.ndarray | None = None,
        bgr: bool = False,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        *,
        sha256: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.embedding_dim = embedding_dim
        self.family = family or name
        self.sha256 = sha256
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.bgr = bgr
        self.network = network.eval().requires_grad_(False)
        identity = np.hstack([np.eye(2), np.zeros((2, 1))])
        same = affine is None or (
            self.input_size == (CROP_SIZE, CROP_SIZE) and np.allclose(affine, identity, atol=1e-4)
        )
        self.register_buffer("theta", None if same else warp_theta(affine, self.input_size), persistent=False)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 255.0 / std_t, persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def train(self, mode: bool = True) -> Recognizer:
        """The wrapped network stays in eval mode (BatchNorm statistics, no dropout) whatever the caller does."""
        super().train(mode)
        self.network.eval()
        return self

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """ArcFace-112 crops in [0, 1] -> exactly what the wrapped network expects."""
        if x.ndim != 4 or x.shape[1:] != (3, CROP_SIZE, CROP_SIZE):
            raise ValueError(
                f"{self.name}: expected B x 3 x {CROP_SIZE} x {CROP_SIZE} crops, got {tuple(x.shape)}"
            )
        if self.theta is not None:
            n = x.shape[0]
            grid = F.affine_grid(self.theta.expand(n, 2, 3), [n, 3, *self.input_size], align_corners=False)
            x = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.bgr:
            x = x.flip(1)
        return x * self.scale + self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.network(self.preprocess(x)).float(), dim=1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embedding_dim={self.embedding_dim}, family={self.family!r}, input_size={self.input_size}"


# PyTorch architectures built from a user's checkpoint, builder(name, weights) -> Recognizer
# (iresnet*, facenet). The models of models.json are not registered: they come from the catalog.
RECOGNIZERS: Registry[Recognizer] = Registry("recognizer", key="recognizer.names")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict from a user's file: bare, or under "state_dict"/"model"; "module." stripped."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weight file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds (pickle, zip, unsafe global)
        raise ModelError(f"{path}: cannot load as a PyTorch checkpoint ({err})") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def fit_state_dict(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load `state` into `module`, or say exactly what does not fit (first few of each kind)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = [
        f"{what} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    if problems:
        raise ModelError(f"{path}: state dict does not fit {type(module).__name__}; " + "; ".join(problems))
    module.load_state_dict(state)
