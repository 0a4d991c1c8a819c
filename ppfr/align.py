"""Face alignment to the ArcFace 112x112 five-point template, with a content-addressed disk cache.

Every part of ppfr consumes aligned RGB crops (method.md, "Input contract"). Detection is the
slow step (~0.05 s per photo on a CPU), so each crop is computed once per file content and kept
as a lossless PNG keyed by the SHA-256 of the file bytes and the aligner version.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from tqdm.auto import tqdm

from ppfr.errors import ConfigError, DataError, check_choice
from ppfr.io import write_with
from ppfr.template import ARCFACE_112, similarity_transform, template

__all__ = ["ARCFACE_112", "AlignResult", "Aligner", "read_image", "similarity_transform", "template"]

# Bump when anything that changes the crops changes: the key then misses and old entries are ignored.
ALIGNER_VERSION = "ppfr-align-2|mtcnn-facenet-2.5.3|nearest-centre|umeyama"
ON_NO_FACE = ("error", "center_crop", "skip")
MIN_DETECT_SIDE = 160  # shorter sides are upsampled to this before detection
MAX_DETECT_SIDE = 1024  # longer sides are reduced to this before detection and warping


@dataclass
class AlignResult:
    """One aligned face: ``crop`` is size x size x 3 uint8 RGB, or None when the image was skipped."""

    crop: np.ndarray | None
    status: str  # detected | center_crop | skipped
    cache_hit: bool
    landmarks: np.ndarray | None  # 5x2 in the source image's pixels, None without a detection
    cache_file: Path | None = None  # the PNG holding this crop, when the aligner has a cache


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image by content (not extension) into HxWx3 uint8 RGB; bad files raise DataError."""
    return decode_image(_read_bytes(Path(path)), path)


def decode_image(data: bytes, name: str | Path) -> np.ndarray:
    """Decode image bytes to HxWx3 uint8 RGB; ``name`` is the file named in errors."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces a full decode so a truncated file fails here, not later
            # Phone photos store their rotation in EXIF; OpenCV's imread applies it, and so do we.
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except UnidentifiedImageError as err:
        raise DataError(f"{name}: not a readable image (unknown or corrupt format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{name}: cannot decode image, file truncated or corrupt ({err})") from err


def warp(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image`` so that its five ``landmarks`` land on the template; border is black.

    A face much larger than the crop is first shrunk with area averaging, since warpAffine's
    bilinear sampling alone aliases when it downsamples by more than 2x.
    """
    matrix = similarity_transform(landmarks, template(size))
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    if scale < 0.5:
        factor = 2 * scale
        h, w = image.shape[:2]
        image = cv2.resize(
            image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA
        )
        matrix = similarity_transform(landmarks * factor, template(size))
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


def center_crop(image: np.ndarray, size: int = 112) -> np.ndarray:
    """The centred square of the image, resized: the fallback when no face is found."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interp)


def nearest_centre(boxes: np.ndarray, shape: tuple[int, ...]) -> int:
    """Index of the box whose centre is nearest the image centre (method.md, alignment note)."""
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    target = np.array([shape[1] / 2, shape[0] / 2])
    return int(np.argmin(((centres - target) ** 2).sum(1)))


def shrink(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Multi-megapixel photos are reduced to MAX_DETECT_SIDE first: detection on them is slow,
    holding them costs memory, and a 112 px crop gains nothing from the extra pixels."""
    long = max(image.shape[:2])
    if long <= MAX_DETECT_SIDE:
        return image, 1.0
    factor = MAX_DETECT_SIDE / long
    h, w = image.shape[:2]
    return cv2.resize(image, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_AREA), factor


class Aligner:
    """Detect (MTCNN), pick the central face and warp it onto the ArcFace template, with a cache.

    ``on_no_face`` decides what an image without a detectable face becomes: ``error`` raises
    DataError, ``center_crop`` returns the centred square, ``skip`` returns no crop. The cache
    stores the detection outcome itself (a face with landmarks, or "no face" with the centre
    crop), so changing ``on_no_face`` never needs the detector again.
    """

    def __init__(
        self,
        cache_dir: str | Path | None,
        on_no_face: str = "error",
        size: int = 112,
        device: str = "cpu",
    ) -> None:
        check_choice("on_no_face", on_no_face, ON_NO_FACE)
        if size < 16:
            raise ConfigError(f"size: {size} is too small for a face crop")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.on_no_face = on_no_face
        self.size = size
        self.device = device
        self._mtcnn = None

    @property
    def detector(self):
        """The MTCNN, built on first use so a fully cached run never loads it."""
        if self._mtcnn is None:
            from facenet_pytorch import MTCNN

            self._mtcnn = MTCNN(keep_all=True, device=self.device)
        return self._mtcnn

    @property
    def detector_built(self) -> bool:
        """Whether this aligner has loaded MTCNN (a fully cached run never does)."""
        return self._mtcnn is not None

    def align(self, path: str | Path) -> AlignResult:
        """Align one image file (see ``align_many``)."""
        return self.align_many([path])[0]

    def align_many(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 16,
        errors: list[DataError] | None = None,
        progress: tqdm | None = None,
    ) -> list[AlignResult | None]:
        """Align many files; cache misses of equal (detection) size go through MTCNN together.

        Unreadable files do not stop the others: they are collected and raised together at the
        end as one DataError naming them, or, with ``errors`` given, appended there (their
        result is None) so that a caller aligning in chunks can report them all at once.
        ``progress`` (a tqdm bar) advances by one per image.
        """
        collect = errors if errors is not None else []
        results: list[AlignResult | None] = [None] * len(paths)
        misses: dict[tuple[int, ...], list[tuple[int, str, np.ndarray, float]]] = defaultdict(list)
        for i, path in enumerate(paths):
            try:
                data = _read_bytes(Path(path))
            except DataError as err:
                collect.append(err)
                _advance(progress)
                continue
            key = self.cache_key(data)
            cached = self._load(key, path)
            if cached is not None:
                results[i] = cached
                _advance(progress)
                continue
            try:
                image, factor = shrink(decode_image(data, path))
            except DataError as err:
                collect.append(err)
                _advance(progress)
                continue
            misses[image.shape].append((i, key, image, factor))
        for group in misses.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start : start + batch_size]
                found = self.detect([image for _, _, image, _ in chunk])
                for (i, key, image, factor), points in zip(chunk, found, strict=True):
                    if points is None:
                        crop, landmarks = center_crop(image, self.size), None
                    else:
                        crop, landmarks = warp(image, points, self.size), points / factor
                    entry = self._store(key, crop, landmarks)
                    results[i] = self._outcome(crop, landmarks, paths[i], False, entry)
                _advance(progress, len(chunk))
        if errors is None and collect:
            raise unreadable(collect)
        return results

    def cache_key(self, data: bytes) -> str:
        """SHA-256 of the file content plus everything that shapes the crop."""
        digest = hashlib.sha256(data)
        digest.update(f"|{ALIGNER_VERSION}|size={self.size}|{template(self.size).tobytes().hex()}".encode())
        return digest.hexdigest()

    def detect(self, images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """Five landmarks (5x2, source pixels) of the face nearest the centre, per image, or None.

        The images must share one shape (MTCNN runs them as one batch). MTCNN misses faces that
        fill a small image (the 150 px bbt crops), so those are upsampled first.
        """
        h, w = images[0].shape[:2]
        scale = max(1.0, MIN_DETECT_SIDE / min(h, w))
        if scale > 1:
            new = (round(w * scale), round(h * scale))
            batch = np.stack([cv2.resize(im, new, interpolation=cv2.INTER_CUBIC) for im in images])
        else:
            batch = np.stack(images)
        boxes, _, points = self.detector.detect(batch, landmarks=True)
        found: list[np.ndarray | None] = []
        for box, point in zip(boxes, points, strict=True):
            if box is None or len(box) == 0:
                found.append(None)
                continue
            k = nearest_centre(np.asarray(box), batch.shape[1:3])
            found.append(np.asarray(point[k], dtype=np.float32) / scale)
        return found

    def _outcome(
        self,
        crop: np.ndarray,
        landmarks: np.ndarray | None,
        path: str | Path,
        cache_hit: bool,
        entry: Path | None,
    ) -> AlignResult:
        """Apply the no-face policy to a detection outcome."""
        if landmarks is not None:
            return AlignResult(crop, "detected", cache_hit, landmarks, entry)
        if self.on_no_face == "error":
            raise DataError(
                f"{path}: no face was detected (set on_no_face to center_crop or skip to accept such images)"
            )
        if self.on_no_face == "center_crop":
            return AlignResult(crop, "center_crop", cache_hit, None, entry)
        return AlignResult(None, "skipped", cache_hit, None, None)

    def _entry(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.png"

    def _load(self, key: str, path: str | Path) -> AlignResult | None:
        entry = self._entry(key)
        if entry is None or not entry.is_file():
            return None
        try:
            with Image.open(entry) as png:
                png.load()
                crop = np.asarray(png.convert("RGB"))
                meta = json.loads(png.text["ppfr"])
        except (OSError, KeyError, ValueError, SyntaxError) as err:
            raise DataError(f"{entry}: corrupt alignment cache entry, delete it ({err})") from err
        landmarks = None if meta["landmarks"] is None else np.array(meta["landmarks"], dtype=np.float32)
        return self._outcome(crop, landmarks, path, True, entry)

    def _store(self, key: str, crop: np.ndarray, landmarks: np.ndarray | None) -> Path | None:
        """Write the PNG atomically (ppfr.io), its landmarks in a text chunk."""
        entry = self._entry(key)
        if entry is None:
            return None
        entry.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "status": "no_face" if landmarks is None else "detected",
            "landmarks": None if landmarks is None else landmarks.tolist(),
            "version": ALIGNER_VERSION,
        }
        info = PngImagePlugin.PngInfo()
        info.add_text("ppfr", json.dumps(meta))
        write_with(entry, lambda f: Image.fromarray(crop).save(f, format="PNG", pnginfo=info))
        return entry


MAX_NAMED = 10  # unreadable files named in one error message; the rest are counted


def unreadable(errors: Sequence[DataError], where: str | Path | None = None) -> DataError:
    """One DataError for several unreadable images: each named with its problem, up to MAX_NAMED."""
    if len(errors) == 1 and where is None:
        return errors[0]
    shown = "; ".join(str(e) for e in errors[:MAX_NAMED])
    more = f"; and {len(errors) - MAX_NAMED} more" if len(errors) > MAX_NAMED else ""
    prefix = f"{where}: " if where is not None else ""
    return DataError(f"{prefix}{len(errors)} unreadable image(s): {shown}{more}")


def progress_bar(total: int, what: str) -> tqdm:
    """A progress bar on stderr with rate and ETA for aligning `total` images, naming torch's thread count.

    Shown also when stderr is not a terminal (a log file then gets a line every 30 s), since
    aligning a large dataset takes minutes to hours.
    """
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=f"aligning {what} (torch threads {torch.get_num_threads()})",
        unit="img",
        file=sys.stderr,
        mininterval=0.5 if tty else 30.0,
        dynamic_ncols=tty,
        disable=total == 0,
    )


def _advance(progress: tqdm | None, n: int = 1) -> None:
    if progress is not None:
        progress.update(n)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"{path}: image file not found") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read file ({err})") from err
