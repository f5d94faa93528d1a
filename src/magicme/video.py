"""Reading and writing clips (.mp4, .gif, a folder of PNG frames) and the JSON run record beside each output.

Frames are uint8 arrays of shape (F, H, W, 3). Every write goes to a temporary name in the target
folder and is renamed into place, so a crash never leaves a half-written video.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def output_kind(path: str | Path) -> str:
    """'mp4', 'gif' or 'frames' (a path without suffix is a folder of PNGs); raise ValueError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return suffix[1:]
    if suffix == "":
        return "frames"
    raise ValueError(f"--out {str(path)!r}: unknown suffix {suffix!r}; use .mp4, .gif, or a folder name without suffix")


def check_output_path(path: str | Path, overwrite: bool = True) -> Path:
    """Validate an output path before any work: known suffix, existing parent folder."""
    path = Path(path)
    output_kind(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"--out {str(path)!r}: folder {str(parent)!r} does not exist")
    if not overwrite and path.exists():
        raise FileExistsError(f"--out {str(path)!r} already exists")
    return path


def sidecar_path(path: str | Path) -> Path:
    """The run record of an output: `clip.mp4` → `clip.mp4.json`, folder `frames` → `frames.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


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


def write_video(frames: Any, path: str | Path, fps: int = 8) -> Path:
    """Write frames to `path` atomically; the suffix picks the format (see `output_kind`)."""
    path = Path(path)
    kind = output_kind(path)
    arr = to_uint8(frames)
    parent = path.parent if str(path.parent) else Path(".")
    if kind == "frames":
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
        try:
            from PIL import Image

            for i, frame in enumerate(arr):
                Image.fromarray(frame).save(tmp / f"{i:05d}.png")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if kind == "mp4":
            _write_mp4(arr, tmp, fps)
        else:
            _write_gif(arr, tmp, fps)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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


def read_video(path: str | Path) -> np.ndarray:
    """Decode an .mp4/.gif/other ffmpeg-readable file or a folder of images into (F, H, W, 3) uint8."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video {str(path)!r} does not exist")
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"video folder {str(path)!r} holds no image frames")
            frames = [np.asarray(Image.open(p).convert("RGB")) for p in files]
        elif path.suffix.lower() == ".gif":
            with Image.open(path) as im:
                frames = []
                for i in range(getattr(im, "n_frames", 1)):
                    im.seek(i)
                    frames.append(np.asarray(im.convert("RGB")))
        else:
            frames = _read_ffmpeg(path)
    except (OSError, UnidentifiedImageError, RuntimeError) as e:
        raise ValueError(f"video {str(path)!r} cannot be decoded ({e})") from None
    if not frames:
        raise ValueError(f"video {str(path)!r} has no frames")
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"video {str(path)!r} has frames of mixed sizes: {sorted(sizes)}")
    return np.stack(frames)


def _read_ffmpeg(path: Path) -> list[np.ndarray]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    return [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("magicme", "torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # an optional package that is not installed is simply not recorded
            continue
    return out


def write_sidecar(output: str | Path, record: dict) -> Path:
    """Write the run record beside `output` atomically, adding package versions and a UTC timestamp."""
    record = dict(record)
    record.setdefault("output", Path(output).name)
    record.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    record.setdefault("versions", package_versions())
    dest = sidecar_path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent if str(dest.parent) else ".")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=2, sort_keys=True, default=str)
        fh.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return dest


def read_sidecar(output: str | Path) -> dict:
    return json.loads(sidecar_path(output).read_text())
