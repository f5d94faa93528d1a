"""Face VCD (paper §4.3): re-render small, blurred faces at full model resolution with the identity.

Faces are detected in every frame, linked into one track per face, and each track's box is smoothed
over time so the crop does not jitter. A square around the face (with margin) is cut from every frame
of the track, the crops form a face-centred clip that is upscaled to the model's size (512) by
interpolation, partially denoised (80 %, §5.2) with the ID tokens and the noise prior, scaled back and
pasted with a feathered mask. Frames without a face are left untouched.

The detector is a parameter (a function frame → boxes): OpenCV's Haar cascade by default, OpenCV's
YuNet when its .onnx model file is given, or anything else a caller passes in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .checks import check_number
from .models import ModelSpec, fingerprint
from .progress import denoising_steps, progress_bar, step_counter
from .v2v import (
    check_common,
    check_context,
    load_stage_pipeline,
    model_size,
    partial_denoise_windows,
    read_input_video,
    resize_frames,
    size_multiple,
    stage_inputs,
    stage_record,
    video_pipeline,
)
from .video import check_clip_size, check_output_path, write_video

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x, y, width, height in pixels
Detector = Callable[[np.ndarray], list[Box]]  # frame (H, W, 3) uint8 RGB → face boxes

# -- detectors ------------------------------------------------------------------------------------------


def haar_detector(min_face: int = 20) -> Detector:
    """OpenCV's bundled frontal-face Haar cascade (offline, no model file; OpenCV 4.x ships it)."""
    import cv2

    xml = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / "haarcascade_frontalface_default.xml"
    if not hasattr(cv2, "CascadeClassifier") or not xml.is_file():
        raise ValueError(
            f"OpenCV {cv2.__version__} has no bundled Haar face cascade (OpenCV 5 moved it to contrib): "
            "install opencv-python-headless<5, or pass --detector with OpenCV's YuNet face_detection_yunet .onnx file"
        )
    cascade = cv2.CascadeClassifier(str(xml))

    def detect(frame: np.ndarray) -> list[Box]:
        gray = cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY))
        found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
        return [tuple(float(v) for v in box) for box in np.asarray(found).reshape(-1, 4)]

    return detect


def yunet_detector(model_path: str | Path, score_threshold: float = 0.7) -> Detector:
    """OpenCV's YuNet CNN face detector (cv2.FaceDetectorYN) from its .onnx model file."""
    import cv2

    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"--detector {str(path)!r} does not exist")
    try:
        net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold)
    except cv2.error as e:
        first = str(e).strip().splitlines()[-1]
        raise ValueError(f"--detector {str(path)!r} is not a YuNet .onnx model OpenCV can read ({first})") from None

    def detect(frame: np.ndarray) -> list[Box]:
        h, w = frame.shape[:2]
        net.setInputSize((w, h))
        _, faces = net.detect(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        return [] if faces is None else [tuple(float(v) for v in f[:4]) for f in faces]

    return detect


def make_detector(model_path: str | Path | None) -> Detector:
    """YuNet when its model file is given, else the Haar cascade."""
    return haar_detector() if model_path is None else yunet_detector(model_path)


# -- tracking and smoothing (pure functions) ----------------------------------------------------------


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


@dataclass
class FaceTrack:
    """One face across consecutive frames: `frames[i]` has box `boxes[i]` (x, y, w, h)."""

    frames: list[int]
    boxes: np.ndarray  # (T, 4)


def track_faces(detections: Sequence[Sequence[Box]], min_iou: float = 0.2, max_gap: int = 3) -> list[FaceTrack]:
    """Link per-frame detections into tracks, greedily by IoU with each track's last box.

    A face missed for up to `max_gap` frames keeps its track, and the missed frames get boxes
    interpolated linearly (detectors flicker; the face has not left). Tracks are sorted by first frame.
    """
    open_tracks: list[dict] = []
    closed: list[dict] = []
    for t, boxes in enumerate(detections):
        for tr in [tr for tr in open_tracks if t - tr["frames"][-1] > max_gap + 1]:
            open_tracks.remove(tr)
            closed.append(tr)
        pairs = sorted(
            ((iou(tr["boxes"][-1], b), i, j) for i, tr in enumerate(open_tracks) for j, b in enumerate(boxes)),
            reverse=True,
        )
        used_tracks, used_boxes = set(), set()
        for score, i, j in pairs:
            if score < min_iou or i in used_tracks or j in used_boxes:
                continue
            used_tracks.add(i)
            used_boxes.add(j)
            open_tracks[i]["frames"].append(t)
            open_tracks[i]["boxes"].append(tuple(boxes[j]))
        for j, b in enumerate(boxes):
            if j not in used_boxes:
                open_tracks.append({"frames": [t], "boxes": [tuple(b)]})
    tracks = []
    for tr in sorted(closed + open_tracks, key=lambda tr: tr["frames"][0]):
        frames = np.arange(tr["frames"][0], tr["frames"][-1] + 1)
        known = np.asarray(tr["boxes"], dtype=np.float64)
        boxes = np.stack([np.interp(frames, tr["frames"], known[:, k]) for k in range(4)], axis=1)
        tracks.append(FaceTrack(frames=frames.tolist(), boxes=boxes))
    return tracks


def smooth_boxes(boxes: np.ndarray, sigma: float) -> np.ndarray:
    """Square face boxes (T, 3) = (centre x, centre y, side) from (x, y, w, h), Gaussian-smoothed over time.

    The kernel is renormalised at the track's ends, so a still face stays exactly where it is.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    params = np.stack([boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2, boxes[:, 2:].max(1)], axis=1)
    if sigma <= 0 or len(params) == 1:
        return params
    t = np.arange(len(params))
    kernel = np.exp(-0.5 * ((t[:, None] - t[None, :]) / sigma) ** 2)
    kernel /= kernel.sum(1, keepdims=True)
    return kernel @ params


def square_crop(cx: float, cy: float, side: float, margin: float, height: int, width: int) -> tuple[int, int, int]:
    """(x0, y0, size) of a square of side·(1 + 2·margin) centred on the face, shifted to lie inside the frame."""
    size = int(round(side * (1 + 2 * margin)))
    size = max(1, min(size, height, width))
    x0 = int(round(cx - size / 2))
    y0 = int(round(cy - size / 2))
    return min(max(x0, 0), width - size), min(max(y0, 0), height - size), size


def feather_mask(size: int, feather: float) -> np.ndarray:
    """(size, size) paste weights: 1 inside, falling to near 0 at the edge over feather·size px (raised cosine)."""
    width = max(1, int(round(feather * size)))
    ramp = np.ones(size, dtype=np.float64)
    n = min(width, size // 2)
    if n > 0:
        r = np.sin(0.5 * np.pi * (np.arange(n) + 0.5) / width) ** 2
        ramp[:n] = r
        ramp[size - n :] = r[::-1]
    return np.outer(ramp, ramp)


def paste(frame: np.ndarray, patch: np.ndarray, x0: int, y0: int, mask: np.ndarray) -> None:
    """Blend `patch` (s, s, 3) into float `frame` at (x0, y0) with weights `mask` (s, s), in place."""
    s = patch.shape[0]
    region = frame[y0 : y0 + s, x0 : x0 + s]
    m = mask[:, :, None]
    frame[y0 : y0 + s, x0 : x0 + s] = region * (1 - m) + patch * m


# -- the face pass ------------------------------------------------------------------------------------------


def restore_faces(
    frames: np.ndarray,
    tracks: list[FaceTrack],
    denoise: Callable[[np.ndarray, int], np.ndarray],
    *,
    size: int,
    margin: float = 0.3,
    feather: float = 0.15,
    smooth: float = 2.0,
) -> np.ndarray:
    """Face VCD on frames (F, H, W, 3) in [0, 1] for the given tracks; returns new frames.

    For each track, the smoothed square crops become a face-centred clip (T, size, size, 3) by cubic
    interpolation; `denoise(clip, track_index)` re-renders it; the result is resized back and pasted
    with a feathered mask. Pixels outside every crop square are returned unchanged.
    """
    out = frames.astype(np.float32, copy=True)
    _, height, width, _ = frames.shape
    for k, track in enumerate(tracks):
        squares = [square_crop(cx, cy, s, margin, height, width) for cx, cy, s in smooth_boxes(track.boxes, smooth)]
        crops = [frames[f, y : y + s, x : x + s].astype(np.float32) for f, (x, y, s) in zip(track.frames, squares)]
        clip = np.stack([resize_frames(c[None], size, size, "cubic")[0] for c in crops])
        clip = np.asarray(denoise(clip, k), dtype=np.float32)
        for f, (x, y, s), face in zip(track.frames, squares, clip):
            back = resize_frames(face[None], s, s, "area" if s < size else "cubic")[0]
            paste(out[f], back, x, y, feather_mask(s, feather))
    return out


@dataclass
class FaceConfig:
    """One Face VCD request (paper §4.3)."""

    prompt: str
    negative_prompt: str = ""
    strength: float = 0.8  # §5.2: Face VCD denoises 80 %
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    gamma: float = 0.15  # §5.2
    fps: int = 8
    identities: list[str] = field(default_factory=list)
    models: ModelSpec = field(default_factory=ModelSpec)
    detector: str | None = None  # YuNet .onnx; None: OpenCV's Haar cascade
    face_size: int | None = None  # §4.3: 512; None: the model's native size (tiny: 64)
    margin: float = 0.3  # crop side = face side · (1 + 2·margin)
    feather: float = 0.15  # feathered edge, as a fraction of the crop side
    smooth: float = 2.0  # σ of the box smoothing, in frames
    context: int = 16  # frames denoised together (AnimateDiff's context)

    def check(self) -> None:
        check_common(self)
        if self.detector is not None:
            if not Path(self.detector).is_file():
                raise FileNotFoundError(f"--detector {self.detector!r} does not exist")
            if Path(self.detector).suffix.lower() != ".onnx":
                raise ValueError(f"--detector must be OpenCV's YuNet .onnx model file, got {self.detector!r}")
        size, multiple = self.size(), size_multiple(self.models)  # Wan: 16
        if not isinstance(size, int) or size < multiple or size % multiple:
            raise ValueError(f"--face-size must be a positive multiple of {multiple}, got {size!r}")
        check_clip_size(1, size, size, "--face-size")
        check_number("--margin", self.margin, low=0, high=10)
        if not 0 < check_number("--feather", self.feather) <= 0.5:
            raise ValueError(f"--feather must be in (0, 0.5], got {self.feather!r}")
        check_number("--smooth", self.smooth, low=0)
        check_context(self.context)

    def size(self) -> int:
        return self.face_size if self.face_size is not None else model_size(self.models)


def face_vcd(
    cfg: FaceConfig,
    video: str | Path,
    out: str | Path,
    *,
    pipe=None,
    detector: Detector | None = None,
    quiet: bool = False,
    device: str | None = None,
    step_callback=None,
) -> Path:
    """Face VCD on the clip at `video`; write `out` and its run record; return `out`.

    Faces are found before any model loads; a clip with no face is written unchanged, with a warning.
    `step_callback` is passed to every denoising call as `callback_on_step_end`.
    """
    cfg.check()
    out = check_output_path(out, inputs=stage_inputs(cfg, video))
    frames = read_input_video(video)
    detect = detector or make_detector(cfg.detector)
    tracks = track_faces([detect(f) for f in frames])
    record = dict(faces=len(tracks), face_frames=sorted({f for t in tracks for f in t.frames}))
    if cfg.detector:
        record["detector_model"] = fingerprint(cfg.detector)
    if not tracks:
        log.warning("no face found in %s: the clip is written unchanged", video)
        write_video(frames, out, fps=cfg.fps, record=stage_record("face", cfg, video, frames.shape, **record))
        return out

    pipe = load_stage_pipeline(cfg.models, cfg.identities, device, quiet, pipe)
    v2v_pipe = video_pipeline(pipe)
    bar = progress_bar(len(tracks) * denoising_steps(cfg.steps, cfg.strength), "face VCD", quiet=quiet)  # one call a track
    on_step = step_counter(bar, step_callback)

    def denoise(clip: np.ndarray, track: int) -> np.ndarray:
        bar.set_postfix_str(f"face {track + 1}/{len(tracks)} ({len(clip)} frames)")
        return partial_denoise_windows(
            v2v_pipe, clip[None], cfg.prompt, context=cfg.context, seeds=[cfg.seed + 100_003 * track],
            strength=cfg.strength, steps=cfg.steps, guidance=cfg.guidance, gamma=cfg.gamma,
            negative_prompt=cfg.negative_prompt, step_callback=on_step,
        )[0]

    with bar:
        result = restore_faces(
            frames.astype(np.float32) / 255.0, tracks, denoise, size=cfg.size(), margin=cfg.margin,
            feather=cfg.feather, smooth=cfg.smooth,
        )
    write_video(result, out, fps=cfg.fps, record=stage_record("face", cfg, video, frames.shape, pipe=pipe, **record))
    return out
