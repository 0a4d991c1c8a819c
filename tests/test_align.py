"""Alignment on the real shared photos: template fit, cache, decoding by content, bad files, no face."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import pytest
from PIL import Image

import datamodules
from ppfr.align import Aligner, read_image
from ppfr.errors import ConfigError, DataError
from ppfr.template import ARCFACE_112, similarity_transform


@pytest.fixture(scope="module")
def lfw_photos(faces_mini):
    """Eight LFW photos of four people (the first genuine pairs of pairs.txt)."""
    names = ["Abel_Pacheco_0001", "Abel_Pacheco_0004", "Akhmed_Zakayev_0001", "Akhmed_Zakayev_0003"]
    names += [
        "Amber_Tamblyn_0001",
        "Amber_Tamblyn_0002",
        "Anders_Fogh_Rasmussen_0001",
        "Anders_Fogh_Rasmussen_0003",
    ]
    return [faces_mini / "lfw" / n.rsplit("_", 1)[0] / f"{n}.jpg" for n in names]


def test_template_values():
    assert ARCFACE_112.shape == (5, 2) and ARCFACE_112.dtype == np.float32
    assert ARCFACE_112[0].tolist() == pytest.approx([38.2946, 51.6963])


def test_similarity_transform_recovers_a_known_similarity():
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = ARCFACE_112 @ rot.T + shift
    matrix = similarity_transform(ARCFACE_112, moved)
    assert np.allclose(matrix, np.hstack([rot, shift[:, None]]), atol=1e-4)


def test_aligned_eyes_land_on_the_template(lfw_photos, align_cache):
    aligner = Aligner(align_cache)
    results = aligner.align_many(lfw_photos)
    assert [r.status for r in results] == ["detected"] * len(lfw_photos)
    crops = [r.crop for r in results]
    assert all(c.shape == (112, 112, 3) and c.dtype == np.uint8 for c in crops)
    # Re-detect on the aligned crops (padded: MTCNN needs some context around a tight crop).
    # MTCNN's own landmark noise is ~2 px, so the mean over the crops must be within 3 px of the
    # template's eyes, and every single crop within 8 px (a wrong face or transform is far off).
    pad = 32
    padded = [cv2.copyMakeBorder(c, pad, pad, pad, pad, cv2.BORDER_CONSTANT) for c in crops]
    found = Aligner(None).detect(padded)
    assert all(p is not None for p in found), "a face was not found again in its aligned crop"
    eyes = np.stack(found)[:, :2] - pad
    each = np.linalg.norm(eyes - ARCFACE_112[:2], axis=2).max(axis=1)
    mean = np.linalg.norm(eyes.mean(axis=0) - ARCFACE_112[:2], axis=1)
    assert mean.max() < 3.0, f"mean eye positions off by {mean.round(2)} px"
    assert each.max() < 8.0, f"eyes off by {each.round(1)} px"


def test_second_call_is_a_cache_hit_without_detector(lfw_photos, align_cache):
    first = Aligner(align_cache).align(lfw_photos[0])
    again = Aligner(align_cache)
    second = again.align(lfw_photos[0])
    assert second.cache_hit and not again.detector_built
    assert np.array_equal(first.crop, second.crop)
    assert np.allclose(first.landmarks, second.landmarks, atol=1e-4)
    # The entry is a lossless PNG under <key[:2]>/<key>.png carrying status and landmarks.
    entry = second.cache_file
    assert entry.parent.name == entry.stem[:2] and entry.parent.parent == align_cache
    with Image.open(entry) as png:
        assert png.format == "PNG"
        meta = json.loads(png.text["ppfr"])
    assert meta["status"] == "detected" and len(meta["landmarks"]) == 5
    assert not list(entry.parent.glob(".tmp-*")), "a temp file was left behind"


def test_cache_is_keyed_by_content_not_name(lfw_photos, align_cache, tmp_path):
    copy = tmp_path / "renamed.jpeg"
    copy.write_bytes(lfw_photos[1].read_bytes())
    Aligner(align_cache).align(lfw_photos[1])
    again = Aligner(align_cache)
    assert again.align(copy).cache_hit and not again.detector_built


def test_webp_with_jpg_name_decodes_and_aligns(faces_mini, align_cache):
    path = faces_mini / "deepface" / "deepface_id03" / "deepface_id03_0003.jpg"
    with Image.open(path) as img:
        assert img.format == "WEBP"
    image = read_image(path)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert Aligner(align_cache).align(path).status == "detected"


def test_grayscale_png_becomes_rgb_and_aligns(faces_mini, align_cache):
    path = faces_mini / "bbt" / "amy" / "amy_0001.png"
    with Image.open(path) as img:
        assert img.mode == "L" and img.size == (150, 150)
    assert read_image(path).shape == (150, 150, 3)
    result = Aligner(align_cache).align(path)
    assert result.status == "detected" and result.crop.shape == (112, 112, 3)


def test_truncated_jpeg_is_a_data_error(lfw_photos, align_cache, tmp_path):
    data = lfw_photos[2].read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"broken\.jpg.*truncated"):
        read_image(broken)
    with pytest.raises(DataError, match=r"broken\.jpg"):
        Aligner(align_cache).align(broken)


def test_not_an_image_and_missing_file(tmp_path, align_cache):
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(DataError, match=r"notes\.jpg: not a readable image"):
        read_image(text)
    with pytest.raises(DataError, match=r"missing\.jpg: image file not found"):
        Aligner(align_cache).align(tmp_path / "missing.jpg")


def test_no_face_policies(tmp_path, align_cache):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((200, 240, 3), 128, np.uint8)).save(grey)
    with pytest.raises(DataError, match=r"grey\.png: no face was detected"):
        Aligner(align_cache, on_no_face="error").align(grey)
    fallback = Aligner(align_cache, on_no_face="center_crop")
    result = fallback.align(grey)
    # The outcome was cached by the first call: no detector for the second policy.
    assert result.status == "center_crop" and result.cache_hit and not fallback.detector_built
    assert result.crop.shape == (112, 112, 3) and (result.crop == 128).all()
    assert result.landmarks is None
    skipped = Aligner(align_cache, on_no_face="skip").align(grey)
    assert skipped.status == "skipped" and skipped.crop is None


def test_bad_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="on_no_face.*'ignore'"):
        Aligner(None, on_no_face="ignore")


def test_dataset_alignment_shows_progress_with_rate_and_threads(lfw_photos, align_cache, tmp_path, capfd):
    root = tmp_path / "lfw" / "Abel_Pacheco"
    root.mkdir(parents=True)
    for photo in lfw_photos[:2]:
        (root / photo.name).write_bytes(photo.read_bytes())
    dm = datamodules.create(
        {"name": "lfw", "root": str(root.parent), "cache_dir": str(align_cache), "pairs_file": None}
    )
    assert len(dm.dataset) == 2
    err = capfd.readouterr().err
    assert f"aligning {root.parent} (torch threads " in err
    assert re.search(r"2/2 \[[0-9:]+<[0-9:]+, +[0-9.]+img/s\]", err), err  # elapsed<ETA, rate
