"""V2V VCD on Wan 2.x (paper §4.3): partial denoising through stock `WanVideoToVideoPipeline`, with the noise prior.

The clip is encoded as the stock pipeline encodes it (VAE posterior mode, normalised by Wan's latent mean and
std), noised to the start timestep of `strength` with noise from the latent noise prior
(`noise_prior.latent_noise_prior`: γ per video frame, carried through the VAE's 1 + 4k frame grouping), and
handed to the pipeline as `latents=`; it runs the remaining steps with its own loop. With γ = 0 the noise is
the pipeline's own draw and the frames are the stock pipeline's, bit for bit. Wan denoises the whole clip at
once (no AnimateDiff context windows); a clip of another length than 1 + 4k is padded with mirrored frames to
the next such length and cut back. Face VCD and Tiled VCD reach this through `v2v.partial_denoise_windows`.
"""

from __future__ import annotations

import numpy as np
import torch

from .noise_prior import latent_noise_prior
from .wan import encode_wan_video
from .wan_generate import wan_frame_count


def is_wan(pipe) -> bool:
    """A Wan pipeline (text-to-video or video-to-video): it has a transformer and no UNet."""
    return getattr(pipe, "transformer", None) is not None and not hasattr(pipe, "unet")


def wan_video_pipeline(pipe):
    """`WanVideoToVideoPipeline` sharing `pipe`'s loaded modules (nothing loads twice; offload hooks stay on them)."""
    import importlib.util

    from diffusers import WanVideoToVideoPipeline

    if importlib.util.find_spec("ftfy") is None:  # the stock pipeline calls ftfy.fix_text on every prompt
        raise ValueError("Wan's video-to-video stages need ftfy (diffusers' WanVideoToVideoPipeline calls it): pip install 'magicme[wan]'")
    out = WanVideoToVideoPipeline(
        tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=pipe.transformer, vae=pipe.vae,
        scheduler=pipe.scheduler,
    )
    out.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return out


def wan_pixel_multiple(pipe) -> int:
    """Frame sides Wan can denoise are multiples of this: the VAE's 8× times the transformer's 2× patch."""
    return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]


def expand_loaded_tokens(tokenizer, prompt: str) -> str:
    """`<v*>` → `<v*> <v*>_1 …` for every multi-vector identity loaded into `tokenizer` (`load_token_identity`).

    Read from the tokenizer itself, as stock diffusers' textual-inversion prompts are, so a stage needs only the
    pipeline; a LoRA identity's trigger word is not an added token and stays as written.
    """
    from .train import expand_prompt

    added = set(tokenizer.get_added_vocab())
    for word in sorted(added, key=len, reverse=True):
        k = 1
        while f"{word}_{k}" in added:
            k += 1
        if k > 1:
            prompt = expand_prompt(prompt, word, k)  # whole words only: '<v*>' not inside '<v*>_1'
    return prompt


def start_latents(vae, video: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B, C, f, h, w) of videos (B, 3, F, H, W) in [-1, 1], one clip at a time, as the stock encodes."""
    return torch.cat([encode_wan_video(vae, clip[None]) for clip in video]).to(torch.float32)


@torch.no_grad()
def wan_noised_latents(pipe, video: torch.Tensor, strength: float, steps: int, gamma: float, generators) -> torch.Tensor:
    """x_t at the start timestep of `strength`: the clips' latents plus latent-noise-prior noise, (B, C, f, h, w)."""
    from .v2v import start_timestep

    init = start_latents(pipe.vae, video)
    noise = latent_noise_prior(
        init.shape, gamma, generator=generators, dtype=torch.float32, device=init.device,
        temporal_scale=pipe.vae_scale_factor_temporal,
    )
    t = start_timestep(pipe, steps, strength).repeat(init.shape[0])
    return pipe.scheduler.add_noise(init, noise, t)


@torch.no_grad()
def wan_partial_denoise(
    pipe,
    clips: np.ndarray,
    prompt: str,
    *,
    strength: float,
    seeds: list[int],
    steps: int = 25,
    guidance: float = 5.0,
    gamma: float = 0.15,
    negative_prompt: str = "",
    step_callback=None,
) -> np.ndarray:
    """Re-run the last `strength` of the schedule on clips (B, F, H, W, 3) in [0, 1] with a `WanVideoToVideoPipeline`.

    Each clip has its own generator from `seeds`. H and W must be multiples of `wan_pixel_multiple` (16).
    """
    clips = np.asarray(clips, dtype=np.float32)
    assert clips.ndim == 5 and clips.shape[-1] == 3 and len(seeds) == clips.shape[0], clips.shape
    b, f, h, w, _ = clips.shape
    multiple = wan_pixel_multiple(pipe)
    if h % multiple or w % multiple:
        raise ValueError(f"Wan denoises frames whose sides are multiples of {multiple}, got {w}×{h}")
    generated = wan_frame_count(f, pipe.vae_scale_factor_temporal)
    if generated > f:  # 1 + 4k frames: mirror the end, cut back after
        clips = np.pad(clips, ((0, 0), (0, generated - f), (0, 0), (0, 0), (0, 0)), mode="symmetric")
    device = pipe._execution_device
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    video = pipe.video_processor.preprocess_video(clips, height=h, width=w).to(device, dtype=torch.float32)
    latents = wan_noised_latents(pipe, video, strength, steps, gamma, generators)
    prompt = expand_loaded_tokens(pipe.tokenizer, prompt)
    negative_prompt = expand_loaded_tokens(pipe.tokenizer, negative_prompt)
    out = pipe(
        prompt=[prompt] * b,
        negative_prompt=[negative_prompt] * b if negative_prompt else None,
        height=h,
        width=w,
        num_inference_steps=steps,
        strength=strength,
        guidance_scale=guidance,
        generator=generators,
        latents=latents,
        output_type="np",
        **({"callback_on_step_end": step_callback} if step_callback else {}),
    )
    return np.asarray(out.frames, dtype=np.float32)[:, :f]
