"""Reading and writing clips (.mp4, .gif, a folder of PNG frames), user images, and the JSON run record
beside each output.

Frames are uint8 arrays of shape (F, H, W, 3). Every write goes to a hidden temporary name in the target
folder and is renamed into place (`outputs.py`), so a crash never leaves a half-written video; a command
replaces only an output whose run record says magicme wrote it. Every user image is opened by
`open_image`, which refuses decompression bombs and tiny images and can downscale huge photos as it
decodes them.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .outputs import atomic_file, atomic_folder, check_output, sidecar_path, write_text, writing, written_by_magicme

VIDEO_SUFFIXES = (".mp4", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FRAME_NAME = re.compile(r"\d{5}\.png")  # the frames of a PNG-folder output: 00000.png, 00001.png, …
MAX_DECODE_PIXELS = 2**27  # 134 MP: an image that decodes to more is refused (a decompression bomb, or too large)
MAX_CLIP_PIXELS = 2**28  # frames × height × width of one clip: 1024 frames of 512², 64 of 2048² (0.8 GB as uint8)
MAX_SIDE = 8192  # pixels, one side of a generated or decoded frame


def output_kind(path: str | Path) -> str:
    """'mp4', 'gif' or 'frames' (a path without suffix is a folder of PNGs); raise ValueError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return suffix[1:]
    if suffix == "":
        return "frames"
    raise ValueError(f"--out {str(path)!r}: unknown suffix {suffix!r}; use .mp4, .gif, or a folder name without suffix")


def is_frames_folder(path: Path) -> bool:
    """A folder holding nothing but the frames `write_video` writes (so replacing it loses nothing else)."""
    return path.is_dir() and all(FRAME_NAME.fullmatch(p.name) and p.is_file() for p in path.iterdir())


def is_own_video(path: Path) -> bool:
    """An existing video output magicme wrote: its run record names it (and a frames folder holds only frames)."""
    return written_by_magicme(path) and (path.is_file() or is_frames_folder(path))


def check_output_path(
    path: str | Path, overwrite: bool = True, *, inputs: Iterable[tuple[str, str | Path]] = (), arg: str = "--out"
) -> Path:
    """Validate a video output before any work (see `outputs.check_output`): a known suffix, an existing
    writable folder, not an input, and, if it exists, a video magicme wrote (replaced) unless `overwrite` is False.

    `inputs` are (argument, path) pairs the output must not be, hold, or lie inside, e.g. [("--video", clip)].
    """
    path = Path(path)
    kind = output_kind(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"{arg} {str(path)!r} already exists")
    return check_output(path, arg=arg, folder=kind == "frames", owned=is_own_video, inputs=inputs)


def to_uint8(frames: Any) -> np.ndarray:
    """Frames as (F, H, W, 3) uint8 from a list of PIL images or an array in [0, 1] (float) or [0, 255]."""
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f.convert("RGB") if hasattr(f, "convert") else f) for f in frames])
    arr = np.asarray(frames)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got shape {arr.shape}")
    return arr


def write_video(frames: Any, path: str | Path, fps: int = 8, record: dict | None = None) -> Path:
    """Write frames to `path` atomically; the suffix picks the format (see `output_kind`).

    With `record`, its run record is written after it (`write_sidecar`), under `outputs.writing` so that
    a kill in between never leaves a record of another clip. A PNG-frames folder replaces an existing
    one only if that holds nothing but frames.
    """
    path = Path(path)
    kind = output_kind(path)
    arr = to_uint8(frames)
    if kind == "frames" and path.exists() and not is_frames_folder(path):
        raise FileExistsError(f"--out {str(path)!r} holds files other than video frames; name a new folder")
    if record is None:
        _write_frames(arr, path, kind, fps)
        return path
    with writing(path):
        _write_frames(arr, path, kind, fps)
        write_sidecar(path, record)
    return path


def _write_frames(arr: np.ndarray, path: Path, kind: str, fps: int) -> None:
    if kind == "frames":
        from PIL import Image

        with atomic_folder(path) as tmp:
            for i, frame in enumerate(arr):
                Image.fromarray(frame).save(tmp / f"{i:05d}.png")
        return
    with atomic_file(path) as tmp:
        if kind == "mp4":
            _write_mp4(arr, tmp, fps)
        else:
            _write_gif(arr, tmp, fps)


def _write_mp4(arr: np.ndarray, path: Path, fps: int) -> None:
    import imageio_ffmpeg

    f, h, w, _ = arr.shape
    # yuv420p needs even sides: pad by edge replication rather than crop, so no pixel is lost
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = arr.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (w, h),
        fps=fps,
        codec="libx264",
        pix_fmt_out="yuv420p",
        quality=None,
        output_params=["-crf", "17", "-movflags", "+faststart"],
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    writer.send(None)
    for frame in arr:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def _write_gif(arr: np.ndarray, path: Path, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(a) for a in arr]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def open_image(path: str | Path, what: str, *, max_side: int | None = None, min_side: int = 1):
    """A user's image file, decoded safely: upright (EXIF orientation applied), loaded, in its own mode.

    Refused with a ValueError naming `what` and the file: unreadable or truncated data, more than
    MAX_DECODE_PIXELS to decode (a decompression bomb), a side under `min_side`. With `max_side`, a larger
    image is downscaled while it loads (JPEG decodes at 1/2…1/8 scale), so memory stays bounded.
    `info["source_size"]` holds the upright size before any downscaling.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies below
            with Image.open(path) as im:
                w, h = im.size
                if max_side and max(w, h) > max_side:
                    im.draft(im.mode, (max_side, max_side))  # JPEG: decode scaled down; other formats: no-op
                if im.width * im.height > MAX_DECODE_PIXELS:
                    raise ValueError(
                        f"{what} {str(path)!r} is {w}×{h} pixels, over the {MAX_DECODE_PIXELS:,}-pixel limit "
                        "(a decompression bomb, or a photo to downscale first)"
                    )
                if max_side and max(w, h) > max_side:
                    im.thumbnail((max_side, max_side), Image.LANCZOS)
                else:
                    im.load()
                orientation = im.getexif().get(0x0112, 1)
                upright = ImageOps.exif_transpose(im)
    except Image.DecompressionBombError:
        raise ValueError(f"{what} {str(path)!r} claims too many pixels (a decompression bomb)") from None
    except UnidentifiedImageError:
        raise ValueError(f"{what} {str(path)!r} is not a readable image (unknown format or corrupt data)") from None
    except (OSError, SyntaxError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{what} {str(path)!r} is not a readable image ({reason})") from None
    upright.info["source_size"] = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    if min(upright.size) < min_side:
        raise ValueError(f"{what} {str(path)!r} is {upright.width}×{upright.height} pixels; at least {min_side}×{min_side} is needed")
    return upright


def check_clip_size(frames: int, height: int, width: int, what: str = "the clip") -> None:
    """Refuse a clip too large to hold: a side over MAX_SIDE or frames × height × width over MAX_CLIP_PIXELS."""
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"{what}: {width}×{height} frames are larger than the {MAX_SIDE}-pixel limit per side")
    if frames * height * width > MAX_CLIP_PIXELS:
        raise ValueError(
            f"{what}: {frames} frames of {width}×{height} are {frames * height * width:,} pixels, over the "
            f"{MAX_CLIP_PIXELS:,}-pixel limit of one clip; use fewer frames or a smaller size"
        )


def read_video(path: str | Path) -> np.ndarray:
    """Decode an .mp4/.gif/other ffmpeg-readable file or a folder of images into (F, H, W, 3) uint8.

    Errors are one line naming the video: undecodable or truncated files, frames of mixed sizes, clips
    over `check_clip_size`'s limits.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video {str(path)!r} does not exist")
    what = f"video {str(path)!r}"
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
            if not files:
                raise ValueError(f"video folder {str(path)!r} holds no image frames")
            frames = []
            for p in files:
                frame = open_image(p, f"{what}: frame").convert("RGB")
                if frames and frame.size != (frames[0].shape[1], frames[0].shape[0]):
                    raise ValueError(f"{what} has frames of mixed sizes: {p.name!r} is {frame.width}×{frame.height}, "
                                     f"the first is {frames[0].shape[1]}×{frames[0].shape[0]}")
                check_clip_size(len(files), frame.height, frame.width, what)
                frames.append(np.asarray(frame))
        elif path.suffix.lower() == ".gif":
            with Image.open(path) as im:
                n = getattr(im, "n_frames", 1)
                check_clip_size(n, im.height, im.width, what)
                frames = []
                for i in range(n):
                    im.seek(i)
                    frames.append(np.asarray(im.convert("RGB")))
        else:
            frames = _read_ffmpeg(path, what)
    except (OSError, UnidentifiedImageError, RuntimeError, EOFError) as e:
        raise ValueError(f"{what} cannot be decoded ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    if not frames:
        raise ValueError(f"{what} has no frames")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"{what} has frames of mixed sizes: {sorted(sizes)}")
    return np.stack(frames)


# ffmpeg's lines that say why a file does not decode (its banner and progress lines do not)
_FFMPEG_REASONS = ("moov atom not found", "partial file", "Invalid data found", "does not contain any stream",
                   "No such file", "Permission denied", "Invalid argument", "Error opening input")


def _ffmpeg_reason(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for key in _FFMPEG_REASONS:
        for line in lines:
            if key in line:
                return re.sub(r"^(\[[^\]]*\]\s*)+", "", line)  # drop ffmpeg's "[mov @ 0x…]" prefixes
    return lines[0] if lines else "ffmpeg failed"


def _read_ffmpeg(path: Path, what: str) -> list[np.ndarray]:
    """Frames via ffmpeg; a truncated file (fewer frames than its header's duration × fps) is refused."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        w, h = meta["size"]
        expected = round(meta.get("duration", 0) * meta.get("fps", 0))
        check_clip_size(max(1, expected), h, w, what)
        frames = []
        for buf in reader:
            frames.append(np.frombuffer(buf, np.uint8).reshape(h, w, 3))
            if len(frames) * h * w > MAX_CLIP_PIXELS:
                check_clip_size(len(frames), h, w, what)
    except (OSError, RuntimeError, StopIteration) as e:
        raise ValueError(f"{what} cannot be decoded (truncated or not a video: {_ffmpeg_reason(str(e))})") from None
    if expected and len(frames) < 0.9 * expected - 1:
        raise ValueError(f"{what} is truncated: {len(frames)} of its {expected} frames decode")
    return frames


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("magicme", "torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # an optional package that is not installed is simply not recorded
            continue
    return out


def clip_fps(path: str | Path) -> int | None:
    """The frame rate a clip plays at: its run record's `fps` where magicme wrote one, else the file's own
    (an mp4's header, a gif's frame duration); None where neither says (PNG frames of another tool)."""
    path = Path(path)
    try:
        fps = json.loads(sidecar_path(path).read_text()).get("fps")
        if isinstance(fps, int) and not isinstance(fps, bool) and fps >= 1:
            return fps
    except (OSError, ValueError, AttributeError):
        pass
    kind = output_kind(path) if not path.is_dir() else "frames"
    try:
        if kind == "mp4":
            import imageio_ffmpeg

            reader = imageio_ffmpeg.read_frames(str(path))
            meta = next(reader)
            reader.close()
            return max(1, round(float(meta.get("fps") or 0))) if meta.get("fps") else None
        if kind == "gif":
            from PIL import Image

            with Image.open(path) as im:
                duration = im.info.get("duration")
            return max(1, round(1000 / duration)) if duration else None
    except (OSError, RuntimeError, StopIteration, ValueError):
        return None
    return None


def write_sidecar(output: str | Path, record: dict) -> Path:
    """Write the run record beside `output` atomically, adding package versions and a UTC timestamp.

    The record names its output (`output`): that is how a later command knows magicme wrote it.
    """
    record = dict(record)
    record.setdefault("output", Path(output).name)
    record.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    record.setdefault("versions", package_versions())
    return write_text(sidecar_path(output), json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")


def read_sidecar(output: str | Path) -> dict:
    return json.loads(sidecar_path(output).read_text())
