"""V2V VCD (paper §4.3): partial denoising of an existing clip with the ID tokens and the noise prior.

The clip is encoded by the VAE, noised to the start timestep of `strength` with noise drawn from the
3D Gaussian noise prior (eq. 4), and handed as `latents=` to diffusers' `AnimateDiffVideoToVideoPipeline`
(or its ControlNet twin), which runs the remaining steps. We never copy their loop: with γ = 0 the
result is the stock pipeline's, bit for bit. A clip longer than the motion module's context runs in
diffusers' FreeNoise windows (overlapping, blended at every step) over one noise-prior draw, as `generate`
does. Face VCD (`face.py`) and Tiled VCD (`upscale.py`) are built on `partial_denoise`.

On the Wan backbone the same functions hand over to `wan_v2v` (stock `WanVideoToVideoPipeline`, the latent
noise prior); the stages do not know which backbone runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .checks import check_number, check_seed
from .generate import check_gamma_arg
from .identity import check_prompt_length, check_prompt_tokens, identity_record, load_identities, read_identity_info, split_spec
from .long_video import plan_windows, windowed
from .models import TINY, ModelSpec, check_motion_frames, fingerprint, load_pipeline, native_resolution
from .noise_prior import correlate_frames
from .progress import denoising_steps, progress_bar, step_counter
from .records import absolute_paths, content_hash, runtime_record, to_jsonable
from .video import check_output_path, read_video, write_video


def check_strength(strength: float, name: str = "--strength") -> float:
    """The fraction of the schedule to re-run, in (0, 1]."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {strength!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {strength}")
    return value


def check_steps(steps: int, strength: float) -> None:
    """Partial denoising runs int(steps × strength) steps (diffusers' rule); at least one is needed."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be an integer >= 1, got {steps!r}")
    if int(steps * strength) < 1:
        raise ValueError(
            f"--steps {steps} × --strength {strength} gives no denoising step; raise --steps to at least {int(np.ceil(1 / strength))}"
        )


def video_pipeline(pipe, controlnet=None):
    """The video-to-video pipeline sharing `pipe`'s loaded modules (nothing loads twice)."""
    from diffusers import AnimateDiffVideoToVideoControlNetPipeline, AnimateDiffVideoToVideoPipeline

    from .wan_v2v import is_wan, wan_video_pipeline

    if is_wan(pipe):
        assert controlnet is None, "ControlNet Tile is SD-1.5's; UpscaleConfig refuses it on Wan"
        return wan_video_pipeline(pipe)
    if controlnet is None:
        out = AnimateDiffVideoToVideoPipeline.from_pipe(pipe)
    else:
        controlnet = controlnet.to(device=pipe.unet.device, dtype=pipe.unet.dtype)
        out = AnimateDiffVideoToVideoControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return out


def start_timestep(pipe, steps: int, strength: float) -> torch.Tensor:
    """The timestep partial denoising starts from: the one the pipeline itself picks for `strength`."""
    device = pipe._execution_device
    pipe.scheduler.set_timesteps(steps, device=device)
    timesteps, _ = pipe.get_timesteps(steps, pipe.scheduler.timesteps, strength, device)
    return timesteps[:1]


def encode_clips(pipe, clips: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """VAE latents (B, F, C, h, w) of clips (B, F, 3, H, W) in [-1, 1], scaled as the UNet expects.

    Uses the pipeline's own `encode_video` with one generator per clip, and upcasts the VAE the way the
    stock pipeline does when its config asks (fp16 SD VAEs overflow).
    """
    vae = pipe.vae
    dtype = clips.dtype
    upcast = vae.config.force_upcast and vae.dtype != torch.float32
    if upcast:
        vae.to(dtype=torch.float32)
        clips = clips.float()
    try:
        # cat, not stack: a contiguous result, like the stock pipeline's (the UNet's kernels follow memory layout)
        latents = torch.cat([pipe.encode_video(clip, g).unsqueeze(0) for clip, g in zip(clips, generators)])
    finally:
        if upcast:
            vae.to(dtype=dtype)
    return vae.config.scaling_factor * latents.to(dtype)


def prior_noise(shape, gamma: float, generators: list[torch.Generator], device, dtype) -> torch.Tensor:
    """Noise of `shape` (B, F, C, h, w) with frame covariance γ^|m−n| (eq. 4), one generator per clip.

    Drawn in the (B, F, …) layout the stock pipeline draws in, so γ = 0 gives its very noise.
    """
    from diffusers.utils.torch_utils import randn_tensor

    if gamma == 0.0:
        return randn_tensor(tuple(shape), generator=generators, device=device, dtype=dtype)
    eps = randn_tensor(tuple(shape), generator=generators, device=device, dtype=torch.float32)
    return correlate_frames(eps, gamma, frame_dim=1).to(dtype)


@torch.no_grad()
def noised_latents(pipe, clips: torch.Tensor, strength: float, steps: int, gamma: float, generators) -> torch.Tensor:
    """x_t at the start timestep of `strength`: encoded clips plus noise-prior noise, (B, C, F, h, w)."""
    init = encode_clips(pipe, clips, generators)
    noise = prior_noise(init.shape, gamma, generators, init.device, init.dtype)
    t = start_timestep(pipe, steps, strength).repeat(init.shape[0])
    return pipe.scheduler.add_noise(init, noise, t).permute(0, 2, 1, 3, 4)


def control_frames(clips: np.ndarray) -> list[np.ndarray]:
    """Per-clip ControlNet conditions in the order the ControlNet video pipeline flattens them.

    The pipeline takes a list of `num_frames` entries and flattens it frame-major, while its latents are
    flattened clip-major (B, F). For B clips we hand it the clip-major sequence cut into F pieces of B,
    so each conditioning image lands on its own clip and frame.
    """
    b, f = clips.shape[:2]
    flat = clips.reshape(b * f, *clips.shape[2:])  # index = clip * F + frame
    return list(flat.reshape(f, b, *clips.shape[2:]))


@torch.no_grad()
def partial_denoise(
    pipe,
    clips: np.ndarray,
    prompt: str,
    *,
    strength: float,
    seeds: list[int],
    steps: int = 25,
    guidance: float = 7.5,
    gamma: float = 0.15,
    negative_prompt: str = "",
    controlnet_scale: float = 1.0,
    step_callback=None,
) -> np.ndarray:
    """Re-run the last `strength` of the schedule on clips (B, F, H, W, 3) in [0, 1]; same shape back.

    `step_callback` is the pipeline's `callback_on_step_end` (progress, or raise to stop).

    `pipe` is a video-to-video pipeline (`video_pipeline`); with a ControlNet, each clip conditions
    itself (ControlNet Tile). Each clip gets its own generator from `seeds`, so a clip's result does not
    depend on which others share its batch. H and W must be multiples of the VAE's scale (8).
    """
    clips = np.asarray(clips, dtype=np.float32)
    assert clips.ndim == 5 and clips.shape[-1] == 3 and len(seeds) == clips.shape[0], clips.shape
    b, f, h, w, _ = clips.shape
    for text in (prompt, negative_prompt):
        if text:
            check_prompt_length(pipe, text)
    device = pipe._execution_device
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    video = pipe.video_processor.preprocess_video(clips, height=h, width=w)  # (B, 3, F, H, W) in [-1, 1]
    video = video.permute(0, 2, 1, 3, 4).to(device=device, dtype=pipe.unet.dtype)
    latents = noised_latents(pipe, video, strength, steps, gamma, generators)
    kwargs = {"callback_on_step_end": step_callback} if step_callback else {}
    if hasattr(pipe, "controlnet"):
        kwargs |= dict(conditioning_frames=control_frames(clips), controlnet_conditioning_scale=controlnet_scale)
    out = pipe(
        prompt=prompt if b == 1 else [prompt] * b,  # one clip: a string, as FreeNoise windows need
        negative_prompt=(negative_prompt if b == 1 else [negative_prompt] * b) if negative_prompt else None,
        height=h,
        width=w,
        num_inference_steps=steps,
        strength=strength,
        guidance_scale=guidance,
        generator=generators,
        latents=latents,
        output_type="np",
        **kwargs,
    )
    return np.asarray(out.frames, dtype=np.float32)


def partial_denoise_windows(pipe, clips: np.ndarray, prompt: str, *, context: int, seeds: list[int], **kwargs) -> np.ndarray:
    """`partial_denoise` of clips (B, F, H, W, 3) of any length; the motion module sees at most `context` frames.

    A longer clip runs in diffusers' FreeNoise windows of `context` frames, `context // 4` apart, blended with
    pyramid weights at every step (as `generate` does), from one noise-prior draw over the whole clip with its
    own seed: no seam where windows meet. It is padded at the end with mirrored frames to a whole number of
    strides (see `long_video.tiled_frames`) and cut back; such clips run one at a time (FreeNoise encodes one
    prompt per call).
    """
    from .wan_v2v import is_wan, wan_partial_denoise

    if is_wan(pipe):  # Wan denoises the whole clip at once
        kwargs.pop("controlnet_scale", None)
        return wan_partial_denoise(pipe, clips, prompt, seeds=seeds, **kwargs)
    b, frames = clips.shape[:2]
    check_motion_frames(min(context, frames), pipe.unet.config.get("motion_max_seq_length"), "--context")
    if frames <= context:
        return partial_denoise(pipe, clips, prompt, seeds=seeds, **kwargs)
    plan = plan_windows(frames, context, max(1, context // 4), "pyramid")
    pad = ((0, 0), (0, plan.padded_frames - frames)) + ((0, 0),) * (clips.ndim - 2)
    padded = np.pad(clips, pad, mode="reflect")
    with windowed(pipe, plan):
        parts = [partial_denoise(pipe, padded[i : i + 1], prompt, seeds=[seeds[i]], **kwargs) for i in range(b)]
    return np.concatenate(parts)[:, :frames]


def check_context(context: int) -> None:
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"--context must be an integer >= 1, got {context!r}")


@dataclass
class V2VConfig:
    """One V2V VCD request: partially denoise a clip with the identity (paper §4.3)."""

    prompt: str
    negative_prompt: str = ""
    strength: float = 0.5  # fraction of the schedule re-run; Face VCD uses 0.8, Tiled VCD 0.2 (§5.2)
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    gamma: float = 0.15  # §5.2
    fps: int | None = None  # None: the input clip's frame rate (its run record's, else its file's; 8 if neither says)
    context: int = 16  # frames denoised together (AnimateDiff's context length)
    identities: list[str] = field(default_factory=list)  # identity .safetensors files (§4.2)
    models: ModelSpec = field(default_factory=ModelSpec)

    def check(self) -> None:
        """Validate every argument before any model work (ValueError naming the argument)."""
        check_common(self)
        check_context(self.context)


def with_clip_fps(cfg, video: str | Path):
    """`cfg` with `fps` set: as given, else the input clip's, so a refined clip plays at its source's speed."""
    from .video import clip_fps

    return cfg if cfg.fps is not None else replace(cfg, fps=clip_fps(video) or 8)


def check_common(cfg) -> None:
    """Checks shared by the V2V, Face and Tiled VCD configs."""
    if not isinstance(cfg.prompt, str) or not cfg.prompt.strip():
        raise ValueError("--prompt must be a non-empty string")
    check_strength(cfg.strength)
    check_steps(cfg.steps, cfg.strength)
    check_gamma_arg(cfg.gamma)
    if cfg.fps is not None and (not isinstance(cfg.fps, int) or isinstance(cfg.fps, bool) or cfg.fps < 1):
        raise ValueError(f"--fps must be an integer >= 1, got {cfg.fps!r}")
    check_number("--guidance", cfg.guidance, low=0)
    check_seed(cfg.seed)
    cfg.models.check()
    if isinstance(cfg.context, int) and not is_wan_spec(cfg.models):  # Wan has no motion module's frame table
        cfg.models.check_frames(cfg.context, "--context")
    check_prompt_tokens([cfg.prompt], [read_identity_info(p) for p in cfg.identities])


def stage_inputs(cfg, video: str | Path) -> list[tuple[str, str | Path]]:
    """What a V2V stage reads, which its output must not be or hold: the clip and the identity files."""
    return [("--video", video)] + [("--identity", split_spec(p)[0]) for p in cfg.identities]
def is_wan_spec(spec: ModelSpec) -> bool:
    return spec.resolved_backbone() == "wan"


def model_size(spec: ModelSpec, pipe=None) -> int:
    """The base model's native side in pixels (SD-1.5 512, SD-2 768, tiny 64; Wan 480): from `pipe` when loaded, else its configs."""
    if is_wan_spec(spec):
        from .wan import wan_native_side

        return wan_native_side(spec)
    return native_resolution(spec, pipe)


def size_multiple(spec: ModelSpec) -> int:
    """Frame, face and tile sides are multiples of this: the VAE's 8 (Wan: 16, its VAE's 8 × the transformer's patch 2)."""
    return 16 if is_wan_spec(spec) else 8


def pixel_multiple(pipe) -> int:
    """`size_multiple` of a loaded pipeline."""
    from .wan_v2v import is_wan, wan_pixel_multiple

    return wan_pixel_multiple(pipe) if is_wan(pipe) else pipe.vae_scale_factor


def stage_dtype(spec: ModelSpec, pipe=None, device: str | None = None) -> torch.dtype:
    """The dtype the stage's models run in: `pipe`'s, or the one `load_pipeline` will choose for `device`."""
    if pipe is not None:
        return pipe.unet.dtype
    return spec.speed.torch_dtype(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


def read_input_video(path: str | Path) -> np.ndarray:
    """The input clip as (F, H, W, 3) uint8, with errors naming --video."""
    try:
        return read_video(path)
    except (ValueError, FileNotFoundError) as e:
        # ffmpeg's errors span many lines; keep the first and the last (the actual reason) on one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = lines[0] if len(lines) < 2 else f"{lines[0]} … {lines[-1]}"
        raise type(e)(f"--video: {message}") from None


def resize_frames(frames: np.ndarray, height: int, width: int, interpolation: str = "lanczos") -> np.ndarray:
    """Resize (F, H, W, 3) float frames; Lanczos up, area down unless told otherwise."""
    import cv2

    if frames.shape[1:3] == (height, width):
        return frames
    flag = {"lanczos": cv2.INTER_LANCZOS4, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}[interpolation]
    if interpolation == "lanczos" and height * width < frames.shape[1] * frames.shape[2]:
        flag = cv2.INTER_AREA  # Lanczos aliases when shrinking
    out = np.stack([cv2.resize(f, (width, height), interpolation=flag) for f in frames])
    return np.clip(out, 0.0, 1.0)


def load_stage_pipeline(models: ModelSpec, identities: list[str], device: str | None, quiet: bool, pipe=None):
    """The base pipeline (loaded once) with the identities in it; the stage draws its own progress bar."""
    if pipe is None:
        pipe = load_pipeline(models, device=device)
    if is_wan_spec(models):
        from .wan_identity import load_wan_identities

        load_wan_identities(pipe, identities)
    else:
        load_identities(pipe, identities)
    pipe.set_progress_bar_config(disable=True)  # one bar over the stage's denoising calls (progress.py)
    return pipe


def v2v(cfg: V2VConfig, video: str | Path, out: str | Path, *, pipe=None, quiet: bool = False, device: str | None = None) -> Path:
    """Partially denoise the clip at `video` with `cfg`; write it to `out` with its run record; return `out`.

    The clip is denoised at its own size rounded down to a multiple of the VAE's scale factor (8 for
    SD; 16 on Wan) and resized back, so the output has the input's frame count and size.
    """
    cfg.check()
    out = check_output_path(out, inputs=stage_inputs(cfg, video))
    cfg = with_clip_fps(cfg, video)
    frames = read_input_video(video)
    f, h, w, _ = frames.shape
    if h < 8 or w < 8:  # 8: every SD-family VAE's scale; checked again against the loaded one below
        raise ValueError(f"--video frames must be at least 8×8 pixels, got {w}×{h}")
    pipe = load_stage_pipeline(cfg.models, cfg.identities, device, quiet, pipe)
    v2v_pipe = video_pipeline(pipe)
    scale = pixel_multiple(pipe)
    if h < scale or w < scale:
        raise ValueError(f"--video frames must be at least {scale}×{scale} pixels (the VAE's scale), got {w}×{h}")
    clip = resize_frames(frames.astype(np.float32) / 255.0, h // scale * scale, w // scale * scale)
    with progress_bar(denoising_steps(cfg.steps, cfg.strength), "v2v", quiet=quiet) as bar:
        if f > cfg.context and not is_wan_spec(cfg.models):  # Wan denoises the whole clip at once
            bar.set_postfix_str(f"{f} frames in windows of {cfg.context}")
        result = partial_denoise_windows(
            v2v_pipe, clip[None], cfg.prompt, context=cfg.context, strength=cfg.strength, seeds=[cfg.seed], steps=cfg.steps,
            guidance=cfg.guidance, gamma=cfg.gamma, negative_prompt=cfg.negative_prompt, step_callback=step_counter(bar),
        )[0]
    write_video(resize_frames(result, h, w), out, fps=cfg.fps, record=stage_record("v2v", cfg, video, frames.shape, pipe=pipe))
    return out


def stage_record(task: str, cfg, video: str | Path, shape: tuple, *, pipe=None, **extra) -> dict:
    """The run record of a V2V stage: its settings, input (with its content hash), models and identities,
    the dtype/device `pipe` ran in (none when nothing was denoised), and the config `--from-record` rebuilds."""
    spec = cfg.models
    models = {"base": fingerprint(spec.base), "scheduler": spec.scheduler_name(), "preset": spec.preset,
              "speed": asdict(spec.speed)}  # --fp8 changes the result
    if is_wan_spec(spec):  # Wan keeps its model's flow-matching scheduler and has no motion adapter
        models = {"backbone": "wan", "base": spec.base_fingerprint()}
        if pipe is not None:
            from .models import scheduler_record
            from .wan import flow_shift

            models["scheduler_config"] = scheduler_record(pipe.scheduler) | {"flow_shift": flow_shift(pipe.scheduler)}
    elif spec.base != TINY:
        models["motion_adapter"] = fingerprint(spec.adapter_name())
        if spec.adapter_weights():
            models["motion_adapter"]["weights"] = spec.adapter_weights()
        if spec.base_config:
            models["base_config"] = spec.base_config
    models |= spec.formats_record()
    models["identities"] = [identity_record(p) for p in cfg.identities]
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("models", "identities")}
    source = {"path": str(Path(video).resolve()), "sha256": content_hash(video), "frames": shape[0], "height": shape[1],
              "width": shape[2]}
    runtime = runtime_record(pipe) if pipe is not None else {}
    return {"task": task, "input": source, "models": models, **settings, **runtime, **extra,
            "config": to_jsonable(absolute_paths(cfg))}
