"""T2V VCD (paper §4.1): AnimateDiff over an SD-1.5-family model, started from the 3D Gaussian noise prior.

We do not copy the pipeline's loop: diffusers' `AnimateDiffPipeline` runs it, and we hand it the
initial latents drawn from the noise prior. With γ = 0 the result is the stock pipeline's, bit for bit.
Clips longer than the motion module's 16 frames, and frame-indexed prompts, run through diffusers'
FreeNoise windows (`long_video.py`) with the noise prior still drawn over every frame; FreeInit is an
option to compare against the prior.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .checks import check_number, check_seed
from .identity import check_prompt_length, check_prompt_tokens, identity_record, load_identities, read_identity_info, split_spec
from .long_video import WindowPlan, plan_windows, prompt_schedule, windowed
from .models import (
    PRESETS, TINY, ModelSpec, check_motion_frames, fingerprint, load_pipeline, native_resolution,
    scheduler_record,
)
from .noise_prior import check_gamma, noise_prior
from .progress import progress_bar, step_counter
from .records import absolute_paths, runtime_record, to_jsonable
from .video import check_clip_size, check_output_path, output_kind, write_video


@dataclass
class GenerateConfig:
    """One T2V VCD request; several prompts × seeds share one loaded model."""

    prompts: list[str]
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    frames: int = 16  # AnimateDiff's context length; more runs in windows
    height: int | None = None  # None: the base model's native size (512 for SD-1.5, 64 for tiny)
    width: int | None = None
    steps: int | None = None  # None: the preset's (25 full, 4 fast, 6 lcm)
    guidance: float | None = None  # None: the preset's (7.5 full, 1.0 fast, 1.5 lcm)
    gamma: float = 0.15  # §5.2
    fps: int = 8
    identities: list[str] = field(default_factory=list)  # identity .safetensors files (§4.2)
    models: ModelSpec = field(default_factory=ModelSpec)
    prompt_at: dict[int, str] = field(default_factory=dict)  # frame → prompt, blended between (prompt travel)
    context_length: int | None = None  # frames per window; None: 16, windows only for longer clips
    context_stride: int = 4  # frames between window starts (FreeNoise's default)
    window_weighting: str = "pyramid"  # how overlapping windows blend (FreeNoise's default)
    free_init: int | None = None  # FreeInit iterations; None: off (the noise prior alone)

    def check(self) -> None:
        """Validate every argument before any model work (ValueError naming the argument)."""
        if not self.prompts and 0 not in self.prompt_at:
            raise ValueError("--prompt is required (or a frame-0 --prompt-at)")
        if any(not isinstance(p, str) or not p.strip() for p in [*self.prompts, *self.prompt_at.values()]):
            raise ValueError("--prompt must be a non-empty string")
        check_gamma_arg(self.gamma)
        for name, value, low in (("--frames", self.frames, 1), ("--fps", self.fps, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("--height", self.height), ("--width", self.width)):
            if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
        # a side not given is at least 64 (tiny's native size); checked again once the model says its own
        check_clip_size(self.frames, self.height or 64, self.width or 64, "--frames/--height/--width")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"--steps must be an integer >= 1, got {self.steps!r}")
        if self.guidance is not None:
            check_number("--guidance", self.guidance, low=0)
        if self.free_init is not None and (not isinstance(self.free_init, int) or self.free_init < 1):
            raise ValueError(f"--free-init must be an integer >= 1 (iterations), got {self.free_init!r}")
        if not self.seeds:
            raise ValueError("--seed needs at least one value")
        for seed in self.seeds:
            check_seed(seed)
        self.models.check()
        for prompt in self.jobs_prompts():
            prompt_schedule(prompt, self.prompt_at, self.frames)
        plan = self.window_plan()
        self.models.check_frames(plan.length if plan else self.frames, "--context-length" if plan else "--frames")
        check_prompt_tokens([*self.prompts, *self.prompt_at.values()], [read_identity_info(p) for p in self.identities])

    def resolved(self) -> "GenerateConfig":
        """A copy with the preset's steps and guidance filled in where none were given."""
        preset = PRESETS[self.models.preset]
        return replace(
            self,
            steps=preset.steps if self.steps is None else self.steps,
            guidance=preset.guidance if self.guidance is None else self.guidance,
        )

    def jobs_prompts(self) -> list[str | None]:
        """The frame-0 prompt of each job (None: `prompt_at` names frame 0 itself)."""
        return list(self.prompts) or [None]

    def window_plan(self) -> WindowPlan | None:
        return plan_windows(
            self.frames, self.context_length, self.context_stride, self.window_weighting, travel=bool(self.prompt_at)
        )

    def size(self, pipe=None) -> tuple[int, int]:
        """(height, width): the given ones, else the base model's native side (UNet sample_size × VAE scale:
        SD-1.5 512, SD-2 768, tiny 64), read from `pipe` when loaded, else from the base's configs."""
        if self.height and self.width:
            return self.height, self.width
        native = native_resolution(self.models, pipe)
        return self.height or native, self.width or native


def check_gamma_arg(gamma: float) -> float:
    try:
        return check_gamma(gamma)
    except ValueError as e:
        raise ValueError(f"--gamma: {e}") from None


def initial_latents(pipe, batch: int, frames: int, height: int, width: int, gamma: float, generator) -> torch.Tensor:
    """Noise-prior latents of the shape, dtype and device `pipe.prepare_latents` would draw (eq. 4)."""
    shape = (
        batch,
        pipe.unet.config.in_channels,
        frames,
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    return noise_prior(shape, gamma, generator=generator, dtype=pipe.text_encoder.dtype, device=pipe._execution_device)


def generate_video(
    pipe,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 0,
    frames: int = 16,
    height: int = 512,
    width: int = 512,
    steps: int = 25,
    guidance: float = 7.5,
    gamma: float = 0.15,
    prompt_at: dict[int, str] | None = None,
    windows: WindowPlan | None = None,
    free_init: int | None = None,
    **pipe_kwargs,
) -> np.ndarray:
    """One clip from a loaded `AnimateDiffPipeline`: frames as (F, H, W, 3) floats in [0, 1].

    `prompt_at` (frame → prompt) travels between prompts; `windows` (see `long_video.plan_windows`)
    runs FreeNoise windows; `free_init` runs that many FreeInit iterations. None of them: stock AnimateDiff.
    """
    for text in [prompt, *(prompt_at or {}).values(), negative_prompt]:
        if text:
            check_prompt_length(pipe, text)
    if prompt_at:
        prompt = prompt_schedule(prompt, prompt_at, frames)  # FreeNoise blends the prompts between frames
        windows = windows or plan_windows(frames, None, 4, "pyramid", travel=True)
    total = windows.padded_frames if windows else frames
    generator = torch.Generator("cpu").manual_seed(seed)
    # eq. 4 over ALL frames: windows start from one correlated draw, not one draw per window
    latents = initial_latents(pipe, 1, total, height, width, gamma, generator)
    with windowed(pipe, windows), free_init_enabled(pipe, free_init):
        out = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            num_frames=total,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            latents=latents,
            output_type="np",
            **pipe_kwargs,
        )
    return out.frames[0][:frames]


@contextmanager
def free_init_enabled(pipe, iterations: int | None):
    """FreeInit (Wu et al. 2023) for one call: its first pass starts from our latents, later ones re-noise them."""
    if iterations is None:
        yield pipe
        return
    pipe.enable_free_init(num_iters=iterations)
    try:
        yield pipe
    finally:
        pipe.disable_free_init()


def output_paths(out: str | Path, prompts: list[str], seeds: list[int]) -> list[Path]:
    """One path per (prompt, seed); a single job keeps `out` as given."""
    out = Path(out)
    if len(prompts) * len(seeds) == 1:
        return [out]
    stem, suffix = (out.name, "") if output_kind(out) == "frames" else (out.stem, out.suffix)
    return [
        out.with_name(f"{stem}_p{i}_s{seed}{suffix}") for i in range(len(prompts)) for seed in seeds
    ]


def generate(
    cfg: GenerateConfig, out: str | Path, *, pipe=None, quiet: bool = False, device: str | None = None,
    step_callback=None,
) -> list[Path]:
    """Run T2V VCD for every prompt × seed in `cfg`, writing each video and its run record; return the paths.

    `step_callback` is the pipeline's `callback_on_step_end` (progress; raising from it stops the run
    before anything of that clip is written). A Wan model runs `wan_generate.generate_wan`.
    """
    if cfg.models.resolved_backbone() == "wan":
        from .wan_generate import generate_wan

        return generate_wan(cfg, out, pipe=pipe, quiet=quiet, device=device, step_callback=step_callback)
    cfg.check()
    cfg = cfg.resolved()
    inputs = [("--identity", split_spec(p)[0]) for p in cfg.identities]
    paths = [check_output_path(p, inputs=inputs) for p in output_paths(out, cfg.jobs_prompts(), cfg.seeds)]
    windows = cfg.window_plan()
    if pipe is None:
        pipe = load_pipeline(cfg.models, device=device)
    height, width = cfg.size(pipe)
    check_clip_size(cfg.frames, height, width, "--frames/--height/--width")
    check_motion_frames(windows.length if windows else cfg.frames, pipe.unet.config.get("motion_max_seq_length"),
                        "--context-length" if windows else "--frames")
    load_identities(pipe, cfg.identities)
    pipe.set_progress_bar_config(disable=True)  # one bar over every clip's steps instead of one per clip
    prompts = cfg.jobs_prompts()
    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in cfg.seeds]
    bar = progress_bar(len(jobs) * cfg.steps * (cfg.free_init or 1), "generate", quiet=quiet)
    for n, ((i, prompt, seed), path) in enumerate(zip(jobs, paths), 1):
        bar.set_postfix_str(f"clip {n}/{len(jobs)}, seed {seed}" + (f", prompt {i + 1}" if len(prompts) > 1 else ""))
        frames = generate_video(
            pipe,
            prompt,
            negative_prompt=cfg.negative_prompt,
            seed=seed,
            frames=cfg.frames,
            height=height,
            width=width,
            steps=cfg.steps,
            guidance=cfg.guidance,
            gamma=cfg.gamma,
            prompt_at=cfg.prompt_at,
            windows=windows,
            free_init=cfg.free_init,
            callback_on_step_end=step_counter(bar, step_callback),
        )
        write_video(frames, path, fps=cfg.fps, record=run_record(cfg, prompt, seed, height, width, pipe=pipe, windows=windows))
    bar.close()
    return paths


def run_record(
    cfg: GenerateConfig, prompt: str | None, seed: int, height: int, width: int, *, pipe=None,
    windows: WindowPlan | None = None,
) -> dict:
    """Everything needed to reproduce one video."""
    spec = cfg.models
    models = {"base": fingerprint(spec.base), "scheduler": spec.scheduler_name(), "preset": spec.preset,
              "speed": asdict(spec.speed)}
    runtime = runtime_record(pipe) if pipe is not None else {}
    if pipe is not None:  # what actually ran, read back from the pipeline
        models["scheduler_config"] = scheduler_record(pipe.scheduler)
    if spec.base != TINY:
        models["motion_adapter"] = fingerprint(spec.adapter_name())
        if spec.adapter_weights():
            models["motion_adapter"]["weights"] = spec.adapter_weights()
        if PRESETS[spec.preset].lora:
            models["lora"] = {"weights": PRESETS[spec.preset].lora, "scale": PRESETS[spec.preset].lora_scale}
        if spec.base_config:
            models["base_config"] = spec.base_config
    models |= spec.formats_record()
    models["identities"] = [identity_record(p) for p in cfg.identities]
    skip = ("prompts", "seeds", "models", "height", "width", "identities", "prompt_at")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    record = {"task": "t2v", "prompt": prompt, "seed": seed, "height": height, "width": width, "models": models, **settings,
              **runtime}
    # this clip's request alone, paths absolute: `magicme generate --from-record` rebuilds it
    record["config"] = to_jsonable(absolute_paths(replace(cfg, prompts=[] if prompt is None else [prompt], seeds=[seed])))
    if cfg.prompt_at:
        record["prompt_at"] = {str(k): v for k, v in prompt_schedule(prompt, cfg.prompt_at, cfg.frames).items()}
    if windows is not None:
        record["windows"] = {
            "length": windows.length, "stride": windows.stride, "weighting": windows.weighting,
            "generated_frames": windows.padded_frames, "ranges": windows.windows(),
        }
    return record
