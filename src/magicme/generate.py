"""T2V VCD (paper §4.1): AnimateDiff over an SD-1.5-family model, started from the 3D Gaussian noise prior.

We do not copy the pipeline's loop: diffusers' `AnimateDiffPipeline` runs it, and we hand it the
initial latents drawn from the noise prior. With γ = 0 the result is the stock pipeline's, bit for bit.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .identity import check_prompt_tokens, load_identities, read_identity_info
from .models import TINY, ModelSpec, TinyPreset, fingerprint, load_pipeline
from .noise_prior import check_gamma, noise_prior
from .video import check_output_path, output_kind, write_sidecar, write_video


@dataclass
class GenerateConfig:
    """One T2V VCD request; several prompts × seeds share one loaded model."""

    prompts: list[str]
    negative_prompt: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    frames: int = 16  # AnimateDiff's context length
    height: int | None = None  # None: the base model's native size (512 for SD-1.5, 64 for tiny)
    width: int | None = None
    steps: int = 25
    guidance: float = 7.5
    gamma: float = 0.15  # §5.2
    fps: int = 8
    identities: list[str] = field(default_factory=list)  # identity .safetensors files (§4.2)
    models: ModelSpec = field(default_factory=ModelSpec)

    def check(self) -> None:
        """Validate every argument before any model work (ValueError naming the argument)."""
        if not self.prompts or any(not isinstance(p, str) or not p.strip() for p in self.prompts):
            raise ValueError("--prompt must be a non-empty string")
        check_gamma_arg(self.gamma)
        for name, value, low in (("--frames", self.frames, 1), ("--steps", self.steps, 1), ("--fps", self.fps, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("--height", self.height), ("--width", self.width)):
            if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
        if not self.guidance >= 0:
            raise ValueError(f"--guidance must be >= 0, got {self.guidance!r}")
        if not self.seeds:
            raise ValueError("--seed needs at least one value")
        self.models.check()
        check_prompt_tokens(self.prompts, [read_identity_info(p) for p in self.identities])

    def size(self) -> tuple[int, int]:
        native = TinyPreset().resolution if self.models.base == TINY else 512
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
    **pipe_kwargs,
) -> np.ndarray:
    """One clip from a loaded `AnimateDiffPipeline`: frames as (F, H, W, 3) floats in [0, 1]."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = initial_latents(pipe, 1, frames, height, width, gamma, generator)
    out = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        latents=latents,
        output_type="np",
        **pipe_kwargs,
    )
    return out.frames[0]


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
    cfg: GenerateConfig, out: str | Path, *, pipe=None, quiet: bool = False, device: str | None = None
) -> list[Path]:
    """Run T2V VCD for every prompt × seed in `cfg`, writing each video and its run record; return the paths."""
    cfg.check()
    paths = output_paths(check_output_path(out), cfg.prompts, cfg.seeds)
    height, width = cfg.size()
    if pipe is None:
        pipe = load_pipeline(cfg.models, device=device)
    load_identities(pipe, cfg.identities)
    pipe.set_progress_bar_config(disable=quiet or not sys.stderr.isatty(), leave=False)
    jobs = [(p, s) for p in cfg.prompts for s in cfg.seeds]
    for (prompt, seed), path in zip(jobs, paths):
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
        )
        write_video(frames, path, fps=cfg.fps)
        write_sidecar(path, run_record(cfg, prompt, seed, height, width))
    return paths


def run_record(cfg: GenerateConfig, prompt: str, seed: int, height: int, width: int) -> dict:
    """Everything needed to reproduce one video."""
    spec = cfg.models
    models = {"base": fingerprint(spec.base), "scheduler": spec.scheduler}
    if spec.base != TINY:
        models["motion_adapter"] = fingerprint(spec.adapter_name())
        if spec.base_config:
            models["base_config"] = spec.base_config
    models["identities"] = [
        {**fingerprint(p), "token": read_identity_info(p).token} for p in cfg.identities
    ]
    skip = ("prompts", "seeds", "models", "height", "width", "identities")
    settings = {k: v for k, v in asdict(cfg).items() if k not in skip}
    return {"task": "t2v", "prompt": prompt, "seed": seed, "height": height, "width": width, "models": models, **settings}
