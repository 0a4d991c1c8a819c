"""The ArcFace 112x112 five-point template and the similarity fit onto it.

Kept apart from the aligner (MTCNN, OpenCV, the cache) so that the protection method and the
recognizers, which only need the geometry, do not import the detector.
"""

from __future__ import annotations

import numpy as np

# Left eye, right eye, nose tip, left and right mouth corners, in pixels of a 112 x 112 crop.
ARCFACE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def template(size: int = 112) -> np.ndarray:
    """The five-point template scaled to a size x size crop."""
    return ARCFACE_112 * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift) mapping src to dst: Umeyama (1991).

    This is what insightface's ``face_align`` computes (via skimage); it uses all five points
    rather than a robust subset, which keeps the template fit stable under expressions.
    Returns the 2 x 3 float32 matrix.
    """
    src = src.astype(np.float64)
    dst = dst.astype(np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1
    rot = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / s0.var(0).sum()
    shift = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, shift[:, None]]).astype(np.float32)
