"""T2V VCD on Wan 2.x: stock `WanPipeline` started from the noise prior over Wan's latent frames, with identities.

We hand the pipeline its initial latents (`latents=`), drawn by `noise_prior.latent_noise_prior` with the
generator it would have used, and let it run its own loop; with γ = 0 the video is the stock pipeline's,
bit for bit. Wan makes 1 + 4k frames: a request for another count generates the next such length and keeps
the first frames asked for.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from .generate import GenerateConfig, output_paths
from .identity import split_spec
from .models import TINY, ModelSpec, fingerprint, scheduler_record
from .noise_prior import latent_noise_prior
from .video import check_output_path, write_video
from .wan import TinyWanPreset, WanDefaults, flow_shift, load_wan_pipeline, wan_latent_shape
from .wan_identity import expand_identity_prompt, load_wan_identities


def default_clip(spec: ModelSpec) -> tuple[int, int]:
    """(frames, fps) a clip has when none are asked for: 16 at 8 fps on AnimateDiff, 81 at 16 fps on Wan."""
    if spec.resolved_backbone() == "wan":
        return WanDefaults().frames, WanDefaults().fps
    defaults = {f.name: f.default for f in fields(GenerateConfig)}
    return defaults["frames"], defaults["fps"]


def wan_frame_count(frames: int, temporal_scale: int = 4) -> int:
    """The shortest length 1 + 4k ≥ `frames` that Wan's causal VAE can make."""
    return 1 + temporal_scale * math.ceil((frames - 1) / temporal_scale)


def check_wan_request(cfg: GenerateConfig) -> None:
    """Refuse AnimateDiff-only options and sizes Wan cannot make (ValueError naming the argument)."""
    if cfg.prompt_at:
        raise ValueError("--prompt-at (prompt travel) runs in AnimateDiff's FreeNoise windows; Wan takes one prompt per clip")
    if cfg.context_length is not None:
        raise ValueError("--context-length sets AnimateDiff's FreeNoise windows; Wan denoises the whole clip at once")
    if cfg.free_init is not None:
        raise ValueError("--free-init is wired for AnimateDiff only; with Wan compare γ = 0 against the noise prior instead")
    for name, value in (("--height", cfg.height), ("--width", cfg.width)):
        if value is not None and (not isinstance(value, int) or value < 16 or value % 16):
            raise ValueError(f"{name} must be a multiple of 16 for Wan (VAE 8× × patch 2), got {value!r}")


def wan_size(cfg: GenerateConfig) -> tuple[int, int]:
    """(height, width): as asked, else 64² on the tiny preset and Wan 2.1's 480 × 832."""
    if cfg.models.base == TINY:
        native = (TinyWanPreset().resolution, TinyWanPreset().resolution)
    else:
        native = (WanDefaults().height, WanDefaults().width)
    return cfg.height or native[0], cfg.width or native[1]


def wan_video(
    pipe,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    frames: int = 81,
    height: int = 480,
    width: int = 832,
    steps: int = 50,
    guidance: float = 5.0,
    gamma: float = 0.15,
    **pipe_kwargs,
) -> np.ndarray:
    """One clip from a loaded `WanPipeline`: frames as (F, H, W, 3) floats in [0, 1]."""
    generated = wan_frame_count(frames, pipe.vae_scale_factor_temporal)
    generator = torch.Generator("cpu").manual_seed(seed)
    # the noise prior over latent frames, drawn as prepare_latents would draw i.i.d. noise (float32, same generator)
    latents = latent_noise_prior(
        wan_latent_shape(pipe, 1, generated, height, width), gamma, generator=generator, dtype=torch.float32,
        device=pipe._execution_device, temporal_scale=pipe.vae_scale_factor_temporal,
    )
    out = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        height=height,
        width=width,
        num_frames=generated,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        latents=latents,
        output_type="np",
        **pipe_kwargs,
    )
    return out.frames[0][:frames]


def wan_schedule(cfg: GenerateConfig) -> tuple[int, float]:
    """(steps, guidance): as asked, else Wan's stock 50 and 5.0."""
    return cfg.steps or WanDefaults().steps, WanDefaults().guidance if cfg.guidance is None else cfg.guidance


def wan_clip(pipe, cfg: GenerateConfig, prompt: str, seed: int, height: int, width: int, infos, step_callback=None) -> np.ndarray:
    """One clip of `cfg` for `prompt` and `seed`, with the identities `infos` already loaded into `pipe`."""
    steps, guidance = wan_schedule(cfg)
    return wan_video(
        pipe,
        expand_identity_prompt(prompt, infos),
        negative_prompt=expand_identity_prompt(cfg.negative_prompt, infos),
        seed=seed,
        frames=cfg.frames,
        height=height,
        width=width,
        steps=steps,
        guidance=guidance,
        gamma=cfg.gamma,
        **({"callback_on_step_end": step_callback} if step_callback else {}),
    )


def wan_record(pipe, cfg: GenerateConfig, prompt: str, seed: int, height: int, width: int, infos) -> dict:
    """The run record of one Wan clip."""
    steps, guidance = wan_schedule(cfg)
    return {
        "task": "t2v", "backbone": "wan", "prompt": prompt, "seed": seed, "height": height, "width": width,
        "frames": cfg.frames, "generated_frames": wan_frame_count(cfg.frames, pipe.vae_scale_factor_temporal),
        "steps": steps, "guidance": guidance, "gamma": cfg.gamma, "fps": cfg.fps, "negative_prompt": cfg.negative_prompt,
        "models": {
            "base": cfg.models.base_fingerprint(),
            "scheduler_config": scheduler_record(pipe.scheduler) | {"flow_shift": flow_shift(pipe.scheduler)},
            "speed": asdict(cfg.models.speed) | {"dtype_used": str(pipe.transformer.dtype).removeprefix("torch.")},
            "identities": [{**fingerprint(str(p)), "token": i.token, "form": i.form} for p, i in zip(cfg.identities, infos)],
        },
    }


def wan_suite_video(pipe, cfg: GenerateConfig, prompt: str, seed: int, height: int, width: int):
    """(frames, run record, identity info or None) of one suite job: `cfg.identities` become the only active ones."""
    infos = load_wan_identities(pipe, cfg.identities)
    frames = wan_clip(pipe, cfg, prompt, seed, height, width, infos)
    return frames, wan_record(pipe, cfg, prompt, seed, height, width, infos), (infos[0] if infos else None)


def generate_wan(
    cfg: GenerateConfig, out: str | Path, *, pipe=None, quiet: bool = False, device: str | None = None,
    step_callback=None,
) -> list[Path]:
    """Run T2V VCD on Wan for every prompt × seed in `cfg`, writing each video and its run record; return the paths."""
    check_wan_request(cfg)
    cfg.check()
    inputs = [("--identity", split_spec(p)[0]) for p in cfg.identities]
    paths = [check_output_path(p, inputs=inputs) for p in output_paths(out, cfg.jobs_prompts(), cfg.seeds)]
    height, width = wan_size(cfg)
    if pipe is None:
        pipe = load_wan_pipeline(cfg.models, device=device)
    infos = load_wan_identities(pipe, cfg.identities)
    pipe.set_progress_bar_config(disable=quiet or not sys.stderr.isatty(), leave=False)
    jobs = [(p, s) for p in cfg.jobs_prompts() for s in cfg.seeds]
    for (prompt, seed), path in zip(jobs, paths):
        record = wan_record(pipe, cfg, prompt, seed, height, width, infos)
        write_video(wan_clip(pipe, cfg, prompt, seed, height, width, infos, step_callback), path, fps=cfg.fps, record=record)
    return paths
