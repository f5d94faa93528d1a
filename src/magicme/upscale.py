"""Tiled VCD (paper §4.3): upscale a clip, then restore its detail tile by tile with the identity.

Every frame is upscaled ×2 (or ×4) by ESRGAN/Real-ESRGAN (`esrgan.py`) or Lanczos, cut into overlapping
tiles of the model's native size, and each tile — as a clip over all frames — is partially denoised
(20 %, §5.2) with the ID tokens, the noise prior and ControlNet Tile conditioned on the tile itself.
Tiles are blended back with a raised-cosine window normalised by the accumulated weight, so the weights
sum to one at every pixel and no seam shows. Only one batch of tiles is on the model at a time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .checks import check_number
from .esrgan import load_rrdbnet
from .models import TINY, ModelNotFoundError, ModelSpec, TinyPreset, _resolve, fingerprint
from .progress import denoising_steps, progress_bar, step_counter
from .v2v import (
    check_common,
    check_context,
    load_stage_pipeline,
    model_size,
    is_wan_spec,
    partial_denoise_windows,
    pixel_multiple,
    size_multiple,
    stage_dtype,
    read_input_video,
    resize_frames,
    stage_inputs,
    stage_record,
    video_pipeline,
    with_clip_fps,
)
from .video import check_clip_size, check_output_path, write_video

log = logging.getLogger(__name__)

DEFAULT_CONTROLNET = "lllyasviel/control_v11f1e_sd15_tile"
NO_CONTROLNET = "none"  # --controlnet none: plain partial denoising of the tiles, as the reference workflow allows

# -- tiling math (pure functions) ---------------------------------------------------------------------


def tile_span(length: int, tile: int, overlap: int, multiple: int = 8) -> tuple[int, list[int]]:
    """The fewest tiles covering [0, length) whose neighbours share at least `overlap` px: (side, start offsets).

    ceil(length / tile) tiles, each widened from length / n just enough to share the overlap (rounded up to a
    multiple of `multiple`, the VAE's scale), so a tile is at most about tile + overlap: 1024 px at tile 512 and
    overlap 64 is 2 tiles of 544 at 0 and 480, not 3 of 512. The tiles are spread evenly, the last flush with the end.
    """
    assert 0 <= overlap < tile <= length and tile % multiple == 0, (length, tile, overlap, multiple)
    n = math.ceil(length / tile)
    while (side := multiple * math.ceil((length + (n - 1) * overlap) / (n * multiple))) > length:
        n += 1  # rounding up overshot a short side: one tile more
    if n == 1:
        return side, [0]
    return side, [round(i * (length - side) / (n - 1)) for i in range(n)]


def ramp_window(tile: int, overlap: int) -> np.ndarray:
    """1-D raised-cosine window: rises over `overlap` px at each end, 1 in the middle, never 0."""
    w = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        w[:overlap] = ramp
        w[tile - overlap :] = ramp[::-1]
    return w


def tile_grid(height: int, width: int, tile: int, overlap: int, multiple: int = 8) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The tile size (th, tw) and the (y, x) of every tile's top-left corner, row by row (see `tile_span`)."""
    th, ys = tile_span(height, tile, overlap, multiple)
    tw, xs = tile_span(width, tile, overlap, multiple)
    return (th, tw), [(y, x) for y in ys for x in xs]


def blend_weights(
    height: int, width: int, tile: int, overlap: int, multiple: int = 8
) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Tile corners, the separable window (th, tw) and its accumulated sum over the frame (H, W).

    The weight of tile i at a pixel is window / total; these sum to one wherever a tile lies, which is
    everywhere (see `tile_span`).
    """
    (th, tw), grid = tile_grid(height, width, tile, overlap, multiple)
    window = np.outer(ramp_window(th, overlap), ramp_window(tw, overlap))
    total = np.zeros((height, width), dtype=np.float64)
    for y, x in grid:
        total[y : y + th, x : x + tw] += window
    return grid, window, total


def tiled_map(
    frames: np.ndarray,
    fn: Callable[[np.ndarray], np.ndarray],
    tile: int,
    overlap: int,
    batch: int = 1,
    multiple: int = 8,
) -> np.ndarray:
    """Apply `fn` to overlapping tile clips of frames (F, H, W, 3) and blend the results back.

    `fn` maps a batch of tile clips (B, F, th, tw, 3) to the same shape; at most `batch` tiles are
    passed at once. With `fn` the identity, the frames come back unchanged (weights sum to one).
    """
    _, height, width, _ = frames.shape
    grid, window, total = blend_weights(height, width, tile, overlap, multiple)
    th, tw = window.shape
    acc = np.zeros(frames.shape, dtype=np.float32)  # float32: a ×4 clip's float64 sum would take GBs
    for i in range(0, len(grid), batch):
        corners = grid[i : i + batch]
        clips = np.stack([frames[:, y : y + th, x : x + tw] for y, x in corners])
        results = fn(clips)
        assert results.shape == clips.shape, (results.shape, clips.shape)
        for (y, x), res in zip(corners, results):
            acc[:, y : y + th, x : x + tw] += res * window[None, :, :, None]
    return (acc / total[None, :, :, None].astype(np.float32)).astype(frames.dtype)


# -- upscaling ------------------------------------------------------------------------------------------


def upscale_frames(frames: np.ndarray, scale: int, model=None) -> np.ndarray:
    """Frames (F, H, W, 3) in [0, 1] upscaled ×`scale`: by an ESRGAN `RRDBNet` when given, else Lanczos.

    A model of another factor (a ×4 model for ×2) runs at its own and is resized to the exact size.
    """
    import torch

    f, h, w, _ = frames.shape
    if model is None:
        log.warning("no --upscaler given: upscaling with Lanczos interpolation (give an ESRGAN .pth for sharper detail)")
        return resize_frames(frames, h * scale, w * scale, "lanczos")
    from .esrgan import esrgan_upscale

    x = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))).to(model.conv_first.weight)
    y = esrgan_upscale(model, x).float().cpu().numpy().transpose(0, 2, 3, 1)
    return resize_frames(y, h * scale, w * scale, "lanczos")


# -- ControlNet Tile ------------------------------------------------------------------------------------


def tiny_controlnet(preset: TinyPreset = TinyPreset(), seed: int = 1):
    """A random-weight ControlNet shaped for the tiny preset's UNet (its zero convs made non-zero, so it acts)."""
    import torch
    from diffusers import ControlNetModel

    from .models import tiny_components

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(tiny_components(preset)["unet"])
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(module.weight, std=0.02)
    return net.eval()


def _controlnet_not_found(name: str, detail: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"--controlnet {name!r} not found: {detail}. Give a hub id (e.g. {DEFAULT_CONTROLNET!r}), a folder saved with "
        "ControlNetModel.save_pretrained, or --controlnet none to restore the tiles without one."
    )


def check_controlnet(name: str) -> str:
    """A ControlNet name that is an existing folder or a hub id (no weights are read); else ModelNotFoundError."""
    try:
        return _resolve("ControlNet", name)[0]
    except ModelNotFoundError:
        raise _controlnet_not_found(name, "no such folder, and not a hub id (owner/name)") from None


def load_controlnet(name: str, dtype=None):
    """ControlNet Tile by hub id or folder; `TINY`: the tiny preset's random one."""
    from diffusers import ControlNetModel

    if name == TINY:
        return tiny_controlnet()
    path = check_controlnet(name)
    try:
        return ControlNetModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:  # hub errors subclass OSError; unreadable configs raise ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _controlnet_not_found(name, f"not a readable ControlNet folder, or not reachable on the hub ({first})") from None


# -- the stage ------------------------------------------------------------------------------------------


@dataclass
class UpscaleConfig:
    """One Tiled VCD request (paper §4.3)."""

    prompt: str
    negative_prompt: str = ""
    scale: int = 2  # §4.3: 512 → 1024 by ESRGAN
    strength: float = 0.2  # §5.2: Tiled VCD denoises 20 %
    upscaler: str | None = None  # ESRGAN/Real-ESRGAN .pth/.safetensors; None: Lanczos
    tile: int | None = None  # None: the model's native size (512; tiny 64); tiles grow by < overlap to stay fewest
    overlap: int | None = None  # None: tile // 8
    tile_batch: int = 4  # tiles denoised together; peak memory grows with it
    context: int = 16  # frames denoised together (AnimateDiff's context length)
    controlnet: str | None = None  # None: lllyasviel/control_v11f1e_sd15_tile (tiny preset: a random tiny one); "none": without
    controlnet_scale: float = 1.0
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    gamma: float = 0.15  # §5.2
    fps: int | None = None  # None: the input clip's frame rate (its run record's, else its file's; 8 if neither says)
    identities: list[str] = field(default_factory=list)
    models: ModelSpec = field(default_factory=ModelSpec)

    def check(self) -> None:
        check_common(self)
        if self.scale not in (2, 4):
            raise ValueError(f"--scale must be 2 or 4, got {self.scale!r}")
        if self.upscaler is not None and not Path(self.upscaler).is_file():
            raise FileNotFoundError(f"--upscaler {self.upscaler!r} does not exist")
        tile, multiple = self.tile_size(), size_multiple(self.models)  # Wan: 16
        if not isinstance(tile, int) or tile < multiple or tile % multiple:
            raise ValueError(f"--tile must be a positive multiple of {multiple}, got {tile!r}")
        overlap = self.overlap_size()
        if not isinstance(overlap, int) or not 0 <= overlap < tile:
            raise ValueError(f"--overlap must be an integer in [0, --tile), got {overlap!r}")
        check_context(self.context)
        if not isinstance(self.tile_batch, int) or self.tile_batch < 1:
            raise ValueError(f"--tile-batch must be an integer >= 1, got {self.tile_batch!r}")
        if is_wan_spec(self.models) and self.controlnet not in (None, NO_CONTROLNET):
            raise ValueError("--controlnet: ControlNet Tile exists for SD-1.5 only; on Wan the tiles are restored without it (leave --controlnet out)")
        check_number("--controlnet-scale", self.controlnet_scale, low=0)
        name = self.controlnet_name()
        if name not in (None, TINY):  # the default too: a bad ControlNet is named before the base model loads
            check_controlnet(name)

    def controlnet_name(self) -> str | None:
        """The ControlNet Tile to load (`TINY` for the tiny preset's), or None for `--controlnet none`."""
        if self.controlnet == NO_CONTROLNET or is_wan_spec(self.models):
            return None
        if self.controlnet is None:
            return TINY if self.models.base == TINY else DEFAULT_CONTROLNET
        return self.controlnet

    def tile_size(self, pipe=None) -> int:
        return self.tile if self.tile is not None else model_size(self.models, pipe)

    def overlap_size(self, pipe=None) -> int:
        return self.overlap if self.overlap is not None else self.tile_size(pipe) // 8

    def check_frame(self, height: int, width: int, pipe=None) -> None:
        """The upscaled frame must hold at least one tile."""
        tile = self.tile_size(pipe)
        if tile > min(height * self.scale, width * self.scale):
            raise ValueError(
                f"--tile {tile} is larger than the upscaled frame ({width * self.scale}×{height * self.scale}); "
                "use a smaller --tile or a larger --scale"
            )


def tile_seeds(seed: int, start: int, count: int) -> list[int]:
    """One seed per tile, so a tile's noise does not depend on the batch it is in."""
    return [int(np.random.SeedSequence([seed, start + i]).generate_state(1)[0]) for i in range(count)]


def tiled_vcd(
    cfg: UpscaleConfig, video: str | Path, out: str | Path, *, pipe=None, quiet: bool = False, device: str | None = None,
    step_callback=None,
) -> Path:
    """Upscale the clip at `video` and restore it tile by tile (Tiled VCD); write `out` and its run record.

    `step_callback` is passed to every denoising call as `callback_on_step_end`.
    """
    cfg.check()
    out = check_output_path(out, inputs=stage_inputs(cfg, video) + ([("--upscaler", cfg.upscaler)] if cfg.upscaler else []))
    cfg = with_clip_fps(cfg, video)
    frames = read_input_video(video)
    cfg.check_frame(*frames.shape[1:3], pipe=pipe)
    check_clip_size(len(frames), frames.shape[1] * cfg.scale, frames.shape[2] * cfg.scale, f"--scale {cfg.scale} output")
    upscaler = load_rrdbnet(cfg.upscaler) if cfg.upscaler else None  # a bad weight file fails before the big models load
    name = cfg.controlnet_name()
    controlnet = load_controlnet(name, dtype=stage_dtype(cfg.models, pipe, device)) if name else None  # before the base, too

    pipe = load_stage_pipeline(cfg.models, cfg.identities, device, quiet, pipe)
    tile, overlap = cfg.tile_size(pipe), cfg.overlap_size(pipe)
    tile_pipe = video_pipeline(pipe, controlnet)

    if upscaler is not None:
        upscaler.to(pipe.device)
    upscaled = upscale_frames(frames.astype(np.float32) / 255.0, cfg.scale, upscaler)
    multiple = pixel_multiple(pipe)
    tiles = len(tile_grid(*upscaled.shape[1:3], tile, overlap, multiple)[1])
    # a clip longer than the context runs alone (FreeNoise windows, one prompt per call); shorter ones in batches
    windows = len(frames) > cfg.context and not is_wan_spec(cfg.models)  # Wan denoises whole clips
    calls = tiles if windows else -(-tiles // cfg.tile_batch)
    bar = progress_bar(calls * denoising_steps(cfg.steps, cfg.strength), "tiled VCD", quiet=quiet)
    on_step = step_counter(bar, step_callback)
    done = 0

    def restore(clips: np.ndarray) -> np.ndarray:
        nonlocal done
        seeds = tile_seeds(cfg.seed, done, len(clips))
        bar.set_postfix_str(f"tiles {done + 1}-{done + len(clips)} of {tiles}")
        done += len(clips)
        return partial_denoise_windows(
            tile_pipe, clips, cfg.prompt, context=cfg.context, seeds=seeds, strength=cfg.strength, steps=cfg.steps, guidance=cfg.guidance,
            gamma=cfg.gamma, negative_prompt=cfg.negative_prompt, controlnet_scale=cfg.controlnet_scale,
            step_callback=on_step,
        )

    with bar:
        result = tiled_map(upscaled, restore, tile, overlap, cfg.tile_batch, multiple)
    extra = {
        "tile": tile,
        "tile_size": list(tile_grid(*upscaled.shape[1:3], tile, overlap, multiple)[0]),
        "overlap": overlap,
        "tiles": done,
        "controlnet_model": fingerprint(name) if name else None,
        **({"controlnet_note": "Wan: no ControlNet Tile exists for it; the tiles are restored by partial denoising alone"}
           if is_wan_spec(cfg.models) else {}),
        "upscaler_model": fingerprint(cfg.upscaler) if cfg.upscaler else "lanczos",
    }
    write_video(result, out, fps=cfg.fps, record=stage_record("upscale", cfg, video, frames.shape, pipe=pipe, **extra))
    return out
