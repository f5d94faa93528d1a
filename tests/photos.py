"""Real photos of people for the face tests, taken from packages on the index (none is committed).

- Grace Hopper: matplotlib's sample data `grace_hopper.jpg` (installed with matplotlib). U.S. Navy
  portrait, a work of the U.S. federal government: public domain.
- Barack Obama (`obama.jpg`, `obama2.jpg`, `obama3.jpg`) and Joe Biden (`biden.jpg`): the test images of
  the `face_recognition` 1.3.0 source distribution (MIT-licensed package). Official White House photos by
  Pete Souza (their metadata says so), works of the U.S. federal government: public domain in the U.S.
  Fetched once with `pip download --no-deps` into a cache (`MAGICME_TEST_CACHE`, default
  ~/.cache/magicme-tests), checked by SHA-256; the tests that need them skip, saying why, when the
  index cannot be reached.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

SDIST = "face_recognition-1.3.0.tar.gz"
SDIST_SHA256 = "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec"
PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg")


def cache_dir() -> Path:
    return Path(os.environ.get("MAGICME_TEST_CACHE") or Path.home() / ".cache" / "magicme-tests")


def grace_hopper() -> Path:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip(f"matplotlib {matplotlib.__version__} ships no sample_data/grace_hopper.jpg")
    return path


def face_recognition_photos() -> dict[str, Path]:
    """{name: path} of the four White House photos, fetched into the cache on first use."""
    folder = cache_dir() / "face_recognition-1.3.0"
    if all((folder / name).is_file() for name in PHOTOS):
        return {name: folder / name for name in PHOTOS}
    folder.mkdir(parents=True, exist_ok=True)
    sdist = folder / SDIST
    if not sdist.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "face_recognition==1.3.0", "-d", str(folder)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0 or not sdist.is_file():
            reason = "timed out" if done is None else (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"real photos: could not fetch face_recognition==1.3.0 from the package index ({reason})")
    if hashlib.sha256(sdist.read_bytes()).hexdigest() != SDIST_SHA256:
        sdist.unlink()
        pytest.fail(f"{sdist} does not have the expected SHA-256 (deleted; it is fetched again next time)")
    with tarfile.open(sdist) as tar:
        for name in PHOTOS:
            member = tar.getmember(f"face_recognition-1.3.0/tests/test_images/{name}")
            data = tar.extractfile(member).read()
            tmp = folder / f".{name}.part"
            tmp.write_bytes(data)
            tmp.replace(folder / name)
    return {name: folder / name for name in PHOTOS}


def load_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def pan_zoom_clip(photo: np.ndarray, face_box, frames=12, size=160, start=96.0, end=32.0):
    """A camera panning across a portrait while zooming out: the face shrinks from `start` to `end` px.

    Returns the frames (F, size, size, 3) uint8 and the known face box of every frame (F, 4).
    """
    side = face_box[2] - face_box[0]
    cx, cy = (face_box[0] + face_box[2]) / 2, (face_box[1] + face_box[3]) / 2
    out, boxes = [], []
    for t in range(frames):
        a = t / (frames - 1)
        s = (start + (end - start) * a) / side
        fx, fy = size * (0.375 + 0.3125 * a), size * (0.5 - 0.1875 * a)  # where the face centre lands
        m = np.float32([[s, 0, fx - s * cx], [0, s, fy - s * cy]])
        out.append(cv2.warpAffine(photo, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT,
                                  borderValue=(128, 128, 128)))
        # warpAffine puts pixel centres on integers; our boxes on i + 0.5
        boxes.append([s * v + m[k % 2, 2] + 0.5 * (1 - s) for k, v in enumerate(face_box)])
    return np.stack(out), np.asarray(boxes)
