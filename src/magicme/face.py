"""Face VCD (paper §4.3): re-render small, blurred faces at full model resolution with the identity.

Faces are detected in every frame (`faces.py`: dlib's HOG detector by default, with landmark boxes),
linked into one track per face, and each track's box is smoothed over time so the crop does not jitter.
A track is re-rendered only when the face was seen in at least `min_track` frames with a mean detector
confidence of at least `min_score`: a false detection in one frame never changes the clip. A square
around the face (with margin) is cut from every frame of the track, the crops form a face-centred clip
that is upscaled to the model's size (512) by interpolation, partially denoised (80 %, §5.2) with the ID
tokens and the noise prior, scaled back and pasted with a feathered mask. Frames without a face are
left untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .checks import check_number
from .faces import DETECTORS, MIN_TRACK_SCORE, Detector, FaceTrack, make_detector, missing_packages, track_faces, track_verdict
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
    with_clip_fps,
)
from .video import check_clip_size, check_output_path, write_video

log = logging.getLogger(__name__)


# -- crops and paste (pure functions) -----------------------------------------------------------------


def smooth_boxes(boxes: np.ndarray, sigma: float) -> np.ndarray:
    """Square face boxes (T, 3) = (centre x, centre y, side) from (x0, y0, x1, y1), Gaussian-smoothed over time.

    The kernel is renormalised at the track's ends, so a still face stays exactly where it is.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    params = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, sides], axis=1)
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


def track_squares(track: FaceTrack, margin: float, smooth: float, height: int, width: int) -> list[tuple[int, int, int]]:
    """(x0, y0, side) of the square crop in each frame of the track: smoothed boxes, grown by the margin."""
    return [square_crop(cx, cy, s, margin, height, width) for cx, cy, s in smooth_boxes(track.boxes, smooth)]


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
        squares = track_squares(track, margin, smooth, height, width)
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
    fps: int | None = None  # None: the input clip's frame rate (its run record's, else its file's; 8 if neither says)
    identities: list[str] = field(default_factory=list)
    models: ModelSpec = field(default_factory=ModelSpec)
    detector: str = "hog"  # hog | cnn (dlib's MMOD) | haar (OpenCV) | a YuNet .onnx file
    min_face: float = 24  # px: smaller faces are not looked for (smaller values upscale frames more)
    min_track: int = 3  # frames a face must be seen in before it is re-rendered (at most the clip's length)
    min_score: float | None = None  # mean detector confidence a track needs; None: the detector's (MIN_TRACK_SCORE)
    face_size: int | None = None  # §4.3: 512; None: the model's native size (tiny: 64)
    margin: float = 0.3  # crop side = face side · (1 + 2·margin)
    feather: float = 0.15  # feathered edge, as a fraction of the crop side
    smooth: float = 2.0  # σ of the box smoothing, in frames
    context: int = 16  # frames denoised together (AnimateDiff's context)

    def check(self) -> None:
        check_common(self)
        if self.detector not in DETECTORS:
            path = Path(str(self.detector))
            if path.suffix.lower() != ".onnx":
                raise ValueError(f"--detector must be one of {', '.join(DETECTORS)} or a YuNet .onnx file, got {self.detector!r}")
            if not path.is_file():
                raise FileNotFoundError(f"--detector {self.detector!r} does not exist")
        elif self.detector == "cnn" and missing_packages():
            raise ValueError(f"--detector cnn needs dlib's face models: {missing_packages()}")
        if not (isinstance(self.min_face, (int, float)) and self.min_face >= 4):
            raise ValueError(f"--min-face must be a number of pixels >= 4, got {self.min_face!r}")
        if not isinstance(self.min_track, int) or self.min_track < 1:
            raise ValueError(f"--min-track must be an integer >= 1, got {self.min_track!r}")
        if self.min_score is not None and not isinstance(self.min_score, (int, float)):
            raise ValueError(f"--min-score must be a number, got {self.min_score!r}")
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


def find_tracks(frames: np.ndarray, cfg: FaceConfig, detector: Detector | None = None, quiet: bool = True):
    """Detect and track the faces of a clip (F, H, W, 3) uint8: (tracks to re-render, run record).

    The record lists every track with its per-frame boxes [x0, y0, x1, y1] in input-frame pixels (None
    where the face was not seen), its mean detector score, whether it is re-rendered and, if not, why.
    """
    if detector is None:
        finder, note = make_detector(cfg.detector, min_face=cfg.min_face)
        detect, kind, what = finder, finder.name, finder.describe()
    else:
        detect, kind, what, note = detector, "custom", "a detector given by the caller", ""
    found = []
    with progress_bar(len(frames), "face: finding faces", quiet=quiet, unit="frame") as bar:
        for f in frames:
            found.append(detect(f))
            bar.update(1)
    tracks = track_faces(found)
    min_frames = min(cfg.min_track, len(frames))
    min_score = cfg.min_score if cfg.min_score is not None else MIN_TRACK_SCORE[kind]
    verdicts = [track_verdict(t, min_frames, min_score) for t in tracks]
    kept = [t for t, why in zip(tracks, verdicts) if not why]
    height, width = frames.shape[1:3]
    entries = []
    for t, why in zip(tracks, verdicts):
        entry = {"boxes": t.record(len(frames)), "frames_seen": t.n_seen, "score": round(t.score, 3), "rendered": not why}
        if why:
            entry["skipped"] = why
        else:
            squares = [None] * len(frames)
            for f, (x, y, s) in zip(t.frames, track_squares(t, cfg.margin, cfg.smooth, height, width)):
                squares[f] = [x, y, x + s, y + s]
            entry["squares"] = squares  # what was cut out and pasted back, per frame
        entries.append(entry)
    record = dict(faces=len(kept), face_frames=sorted({f for t in kept for f in t.frames}), tracks=entries,
                  face_detector=what, min_track_frames=min_frames, min_track_score=min_score)
    if note:
        record["face_detector_note"] = note
    if cfg.detector not in DETECTORS:
        record["detector_model"] = fingerprint(cfg.detector)
    return kept, record


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

    Faces are found before any model loads; a clip with no face to re-render is written unchanged,
    with a warning. `detector` replaces `cfg.detector` (a function frame → `Face`s or (x, y, w, h)
    boxes). `step_callback` is passed to every denoising call as `callback_on_step_end`.
    """
    cfg.check()
    out = check_output_path(out, inputs=stage_inputs(cfg, video))
    cfg = with_clip_fps(cfg, video)
    frames = read_input_video(video)
    tracks, record = find_tracks(frames, cfg, detector, quiet)
    if not tracks:
        skipped = len(record["tracks"])
        why = f"{skipped} brief or unsure face track(s), not re-rendered" if skipped else "no face found"
        log.warning("%s in %s: the clip is written unchanged", why, video)
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
