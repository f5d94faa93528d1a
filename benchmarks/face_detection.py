"""Face detection for Face VCD: seconds per frame, frames found and tracks, per detector, on a real portrait.

The clip is tests/test_faces.py's pan over Grace Hopper's portrait (matplotlib's sample data, public
domain) scaled to 512² frames, the face shrinking from 192 to 32 px: what `magicme face` sees in a
16-frame AnimateDiff clip with a face in the distance. For each detector and `--min-face`, one pass
over the clip: median seconds per frame, frames where the face was found (IoU ≥ 0.5 with the known
box) and face tracks. The CNN is slow on a CPU; `--cnn` adds it.

    python benchmarks/face_detection.py [--frames 16] [--cnn]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import print_table, record  # noqa: E402
from photos import grace_hopper, load_rgb, pan_zoom_clip  # noqa: E402

from magicme.faces import FaceFinder, iou, track_faces  # noqa: E402

HOPPER_BOX = (161, 127, 377, 343)  # her landmark box, checked by eye (tests/test_faces.py)


def run(kind: str, min_face: float, frames, known) -> dict:
    finder = FaceFinder(kind, min_face=min_face)
    times, found = [], []
    for frame in frames:
        t = time.perf_counter()
        found.append(finder(frame))
        times.append(time.perf_counter() - t)
    hits = sum(any(iou(f.box, k) >= 0.5 for f in faces) for faces, k in zip(found, known))
    return {"detector": kind, "min_face_px": min_face, "s_per_frame": round(statistics.median(times), 3),
            "frames_found": f"{hits}/{len(frames)}", "tracks": len(track_faces(found))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--cnn", action="store_true", help="also time dlib's MMOD CNN (slow on a CPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    frames, known = pan_zoom_clip(load_rgb(grace_hopper()), HOPPER_BOX, frames=args.frames, size=512, start=192, end=32)
    known = [[v * 1.0 for v in k] for k in known]
    rows = [run(kind, mf, frames, known) for kind in ("hog", "haar") + (("cnn",) if args.cnn else ()) for mf in (24, 40)]
    print_table(rows)
    record("face_detection", rows, torch.device("cpu"))


if __name__ == "__main__":
    main()
