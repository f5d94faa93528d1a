"""Draw docs/face-detection.jpg: Face VCD's face detection on a real portrait (the README's figure).

The clip is the one tests/test_faces.py checks: a camera panning over Grace Hopper's portrait
(U.S. Navy photo, public domain; matplotlib ships it) while zooming out, the face shrinking from 96
to 32 px. Top: the frames. Bottom: what `magicme face` finds with its defaults (dlib's HOG detector):
the landmark box of the one face track (green), dlib's 5 landmarks (yellow) and the square that Face VCD
cuts out, re-renders at 512 px and pastes back (white). Run: python docs/face_figure.py
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from photos import grace_hopper, load_rgb, pan_zoom_clip  # noqa: E402

from magicme.face import FaceConfig, find_tracks  # noqa: E402
from magicme.faces import FaceFinder  # noqa: E402

HOPPER_BOX = (161, 127, 377, 343)  # her landmark box, checked by eye (tests/test_faces.py)
SHOW = (0, 4, 8, 11)  # frames shown
ZOOM = 2


def main(out: Path = Path(__file__).with_name("face-detection.jpg")) -> Path:
    frames, _ = pan_zoom_clip(load_rgb(grace_hopper()), HOPPER_BOX)
    (track,), record = find_tracks(frames, FaceConfig(prompt="a woman"))
    finder = FaceFinder("hog")
    size = frames.shape[1] * ZOOM
    sheet = Image.new("RGB", (len(SHOW) * (size + 6) - 6, 2 * size + 6 + 18), "white")
    draw = ImageDraw.Draw(sheet)
    entry = record["tracks"][0]
    for col, f in enumerate(SHOW):
        x = col * (size + 6)
        big = Image.fromarray(frames[f]).resize((size, size), Image.Resampling.NEAREST)
        sheet.paste(big, (x, 0))
        after = big.copy()
        d = ImageDraw.Draw(after)
        box = [v * ZOOM for v in entry["boxes"][f]]
        d.rectangle([v * ZOOM for v in entry["squares"][f]], outline="white", width=1)
        d.rectangle(box, outline=(0, 255, 0), width=2)
        for px, py in finder(frames[f])[0].landmarks * ZOOM:
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill="yellow")
        sheet.paste(after, (x, size + 6))
        draw.text((x + 4, 2 * size + 8), f"frame {f}: face {box[2] / ZOOM - box[0] / ZOOM:.0f} px", fill="black")
    sheet.save(out, quality=80)
    print(f"{out}: {len(record['tracks'])} track, seen in {track.n_seen} of {len(frames)} frames")
    return out


if __name__ == "__main__":
    main()
