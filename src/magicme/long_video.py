"""Long videos: context windows over frames (FreeNoise) and frame-indexed prompts (prompt travel).

The motion module attends over at most `context_length` frames (16 for AnimateDiff). diffusers'
FreeNoise support runs its temporal attention over sliding windows of that length, `context_stride`
frames apart, and blends overlapping windows with per-position weights. We keep the noise prior's
covariance γ^|m−n| over the whole clip (paper eq. 4): the pipeline gets our latents for every frame,
which FreeNoise's `_prepare_latents_free_noise` returns unchanged when they span `num_frames`.

The heavy intermediate tensors stay one window's size: FreeNoise windows the motion modules, and its
split inference runs the spatial layers `context_length` frames at a time and the motion modules on
pixel slices that shrink as the clip grows. Only clip-long tensors (latents, skip connections, the
output frames) grow with the clip.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass

MOTION_CONTEXT = 16  # frames AnimateDiff's motion modules were trained on
WEIGHTING_SCHEMES = ("pyramid", "flat", "delayed_reverse_sawtooth")  # FreeNoise's blend weights
SPLIT_BUDGET = 256 * MOTION_CONTEXT  # (pixel rows × frames) per motion-module chunk
_PROMPT_AT = re.compile(r"^\s*(\d+)\s*:(.*)$", re.S)


@dataclass(frozen=True)
class WindowPlan:
    """How a clip of `frames` frames is covered by windows; `padded_frames` ≥ `frames` are generated."""

    frames: int
    padded_frames: int
    length: int
    stride: int
    weighting: str

    def windows(self) -> list[tuple[int, int]]:
        return context_windows(self.padded_frames, self.length, self.stride)


def check_context(length: int, stride: int, weighting: str, frames: int) -> None:
    """Validate the window settings against the clip (ValueError naming the argument)."""
    for name, value in (("--context-length", length), ("--context-stride", stride)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if stride > length:
        raise ValueError(f"--context-stride ({stride}) must be <= --context-length ({length}), or frames between windows are skipped")
    if length > frames:
        raise ValueError(f"--context-length ({length}) must be <= --frames ({frames})")
    if weighting not in WEIGHTING_SCHEMES:
        raise ValueError(f"--window-weighting must be one of {', '.join(WEIGHTING_SCHEMES)}, got {weighting!r}")


def context_windows(frames: int, length: int, stride: int) -> list[tuple[int, int]]:
    """FreeNoise's windows as [start, end) frame ranges: every `stride` frames, plus one flush with the end."""
    windows = [(s, s + length) for s in range(0, frames - length + 1, stride)]
    if windows[-1][1] != frames:
        windows.append((frames - length, frames))
    return windows


def tiled_frames(frames: int, length: int, stride: int) -> int:
    """Smallest frame count ≥ `frames` whose windows, `stride` apart, end exactly on the last frame.

    diffusers 0.42's FreeNoise block normalises a flush window's last frames by a single weight, which
    mis-scales them under the pyramid weights (the last frame comes out halved for 26 frames); on a
    tiled count every window is a regular one, so we generate that many frames and drop the extra.
    """
    return length + stride * math.ceil(max(0, frames - length) / stride)


def plan_windows(
    frames: int, length: int | None, stride: int, weighting: str, travel: bool = False
) -> WindowPlan | None:
    """Windows for a clip, or None where one pass covers it (≤ 16 frames, no explicit windows, no travel)."""
    if length is None:
        if frames <= MOTION_CONTEXT and not travel:
            check_context(MOTION_CONTEXT, stride, weighting, MOTION_CONTEXT)  # unused here, but still wrong
            return None
        length = min(MOTION_CONTEXT, frames)
        stride = min(stride, length)
    check_context(length, stride, weighting, frames)
    return WindowPlan(frames, tiled_frames(frames, length, stride), length, stride, weighting)


def parse_prompt_at(specs: list[str]) -> dict[int, str]:
    """`["0:a <v*> dog walks", "32:a <v*> dog runs"]` → {0: "a <v*> dog walks", 32: "a <v*> dog runs"}."""
    schedule: dict[int, str] = {}
    for spec in specs:
        m = _PROMPT_AT.match(spec)
        if not m or not m.group(2).strip():
            raise ValueError(f"--prompt-at {spec!r} must be FRAME:PROMPT, e.g. 32:\"a dog runs\"")
        frame = int(m.group(1))
        if frame in schedule:
            raise ValueError(f"--prompt-at gives frame {frame} twice")
        schedule[frame] = m.group(2).strip()
    return schedule


def prompt_schedule(prompt: str | None, prompt_at: dict[int, str], frames: int) -> dict[int, str]:
    """Frame → prompt for one clip: `prompt` starts it unless `prompt_at` names frame 0 itself."""
    for frame in prompt_at:
        if not 0 <= frame < frames:
            raise ValueError(f"--prompt-at frame {frame} is outside the clip (frames 0 to {frames - 1})")
    schedule = dict(prompt_at)
    if prompt is not None and 0 not in schedule:
        schedule[0] = prompt
    if 0 not in schedule:
        raise ValueError("--prompt-at needs a prompt for frame 0 (or give --prompt)")
    return dict(sorted(schedule.items()))


@contextmanager
def windowed(pipe, plan: WindowPlan | None):
    """Run `pipe` with FreeNoise windows and split inference for `plan`; restore the stock modules after."""
    if plan is None:
        yield pipe
        return
    from .speed import plain_motion_modules

    # FreeNoise copies each motion block by its state dict: our fused/FP8 layers step aside meanwhile
    with plain_motion_modules(pipe.unet):
        # our latents span every frame, so FreeNoise returns them unchanged instead of drawing shuffled noise
        pipe.enable_free_noise(
            context_length=plan.length, context_stride=plan.stride, weighting_scheme=plan.weighting, noise_type="random"
        )
        # spatial layers see one window of frames at a time; the motion modules see (rows × all frames) per
        # chunk, so rows shrink as the clip grows: diffusers' default 256 rows at 16 frames, at any length
        rows = max(1, SPLIT_BUDGET // plan.padded_frames)
        pipe.enable_free_noise_split_inference(spatial_split_size=rows, temporal_split_size=plan.length)
        try:
            yield pipe
        finally:
            _unwrap_split_inference(pipe)
            pipe.disable_free_noise()


def _unwrap_split_inference(pipe) -> None:
    """Undo `enable_free_noise_split_inference` (diffusers has no inverse): put each wrapped module back."""
    from diffusers.pipelines.free_noise_utils import SplitInferenceModule

    def unwrap(m):
        return m.module if isinstance(m, SplitInferenceModule) else m

    unet = pipe.unet
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for motion_module in getattr(block, "motion_modules", None) or []:
            motion_module.proj_in = unwrap(motion_module.proj_in)
            motion_module.proj_out = unwrap(motion_module.proj_out)
            for i, m in enumerate(motion_module.transformer_blocks):
                motion_module.transformer_blocks[i] = unwrap(m)
        for name in ("attentions", "resnets", "downsamplers", "upsamplers"):
            modules = getattr(block, name, None)
            for i, m in enumerate(modules or []):
                modules[i] = unwrap(m)
