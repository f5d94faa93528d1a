"""The Wan 2.x backbone (diffusers' `WanPipeline`): tiny random-weight preset, model loader, backbone detection.

Wan 2.1/2.2 text-to-video models are diffusion transformers (`WanTransformer3DModel`) over the latents
of a causal 3D VAE (`AutoencoderKLWan`: 8× in space, 4× in time, the first frame alone), conditioned
on a UMT5 text encoder and sampled by flow matching. The tiny preset builds all of them from small
configs shaped like diffusers' own dummy test components, with a UMT5-form tokenizer learned offline
(`tokenizer.tiny_umt5_tokenizer`), so every Wan code path runs on a CPU in seconds; it saves as a stock
diffusers folder that `WanPipeline.from_pretrained` loads.

The stages call the backbone through plain functions here (`load_wan_pipeline`, `wan_latent_shape`,
`encode_wan_video`), so the video-to-video stages can use the same ones with `WanVideoToVideoPipeline`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

BACKBONES = ("auto", "animatediff", "wan")
WAN_T2V_PIPELINES = ("WanPipeline",)  # model_index.json `_class_name` of Wan 2.1/2.2 text-to-video models
DEFAULT_WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


@dataclass(frozen=True)
class WanDefaults:
    """Stock settings of Wan 2.1 T2V (WanPipeline's call defaults; 16 fps as Wan's own config)."""

    frames: int = 81  # 1 + 4k: 5 s at 16 fps
    height: int = 480
    width: int = 832
    steps: int = 50
    guidance: float = 5.0
    fps: int = 16


@dataclass(frozen=True)
class TinyWanPreset:
    """Configs of the tiny random-weight Wan preset (diffusers' Wan pipeline tests use the same shapes)."""

    seed: int = 0
    text_dim: int = 32  # UMT5 width = the transformer's text_dim (4096 in real Wan)
    text_layers: int = 2
    heads: int = 2
    head_dim: int = 12
    layers: int = 2
    vae_base_dim: int = 3
    flow_shift: float = 3.0  # Wan 2.1 1.3B's sampling shift at 480p
    resolution: int = 64  # pixels; a multiple of 16 (VAE 8× × patch 2)
    vocab_multiple: int = 128  # the embedding is padded past the tokenizer, as UMT5's (256384 rows) is


def tiny_wan_components(preset: TinyWanPreset = TinyWanPreset()) -> dict:
    """Build the tiny Wan preset: tokenizer, text_encoder (UMT5), vae, transformer, scheduler (UniPC, flow)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .tokenizer import tiny_umt5_tokenizer

    tokenizer = tiny_umt5_tokenizer()
    rows = -(-len(tokenizer) // preset.vocab_multiple) * preset.vocab_multiple
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(preset.seed)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=rows, d_model=preset.text_dim, d_kv=8, d_ff=64, num_layers=preset.text_layers, num_heads=4,
                relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKLWan(
            base_dim=preset.vae_base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=preset.heads, attention_head_dim=preset.head_dim,
            in_channels=16, out_channels=16, text_dim=preset.text_dim, freq_dim=256, ffn_dim=32,
            num_layers=preset.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
        )
    for m in (text_encoder, vae, transformer):
        m.eval()
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=preset.flow_shift
    )
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def save_tiny_wan_model(folder: str | Path, preset: TinyWanPreset = TinyWanPreset()) -> Path:
    """Write the tiny Wan preset as a stock diffusers folder (`WanPipeline.from_pretrained(folder)` loads it)."""
    from diffusers import WanPipeline

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; choose a new folder")
    WanPipeline(**tiny_wan_components(preset)).save_pretrained(folder)
    return folder


def wan_native_side(spec) -> int:
    """The side of a square crop (Face VCD) or tile (Tiled VCD) on Wan: the tiny preset's 64, else 480 (Wan's 480p)."""
    from .models import TINY

    return TinyWanPreset().resolution if spec.base == TINY else WanDefaults().height


def tiny_wan_fingerprint() -> dict:
    return {"name": "tiny", "backbone": "wan", "preset": asdict(TinyWanPreset())}


# ---- which backbone a model is ----

def read_model_index(name: str) -> dict | None:
    """`model_index.json` of a diffusers folder or hub id (hub: the cached or downloaded file); None if unreadable."""
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            index = path / "model_index.json"
            return json.loads(index.read_text()) if index.is_file() else None
        if path.exists():
            return None  # a single file
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name, "model_index.json")).read_text())
    except Exception:  # offline, no such repo, invalid JSON: the loader reports it with its own message
        return None


def detect_backbone(base: str) -> str:
    """'wan' for a Wan T2V diffusers model (by `model_index.json`'s `_class_name`), else 'animatediff'."""
    if base == "tiny":
        return "animatediff"
    index = read_model_index(base) or {}
    cls = str(index.get("_class_name", ""))
    if cls in WAN_T2V_PIPELINES:
        return "wan"
    if cls.startswith("Wan"):
        raise ValueError(f"--base {base!r} is a {cls} model; magicme uses Wan's text-to-video models (WanPipeline, Wan 2.1/2.2 T2V)")
    return "animatediff"


def check_wan_spec(spec) -> None:
    """The model flags that mean something for Wan (ValueError naming the one that does not)."""
    from .models import TINY, _is_single_file, _resolve

    if spec.motion_adapter not in (None, TINY):
        raise ValueError("--motion-adapter is AnimateDiff's; a Wan model has no motion adapter")
    if spec.preset != "full":
        raise ValueError(f"--preset {spec.preset} is an AnimateDiff draft preset; with Wan leave it at full")
    if spec.scheduler != "ddim":  # the default: Wan keeps its own flow-matching scheduler
        raise ValueError(f"--scheduler {spec.scheduler} is an AnimateDiff scheduler; Wan uses its model's flow-matching scheduler")
    if spec.loras or spec.motion_loras or spec.freeu is not None or spec.clip_skip:
        flag = "--lora" if spec.loras else "--motion-lora" if spec.motion_loras else "--freeu" if spec.freeu is not None else "--clip-skip"
        raise ValueError(f"{flag} is for SD-1.5-family models (AnimateDiff); a Wan identity in LoRA form is given with --identity")
    if spec.base_config is not None:
        raise ValueError("--base-config is for single-file AnimateDiff checkpoints; give Wan as a diffusers folder or hub id")
    if spec.base != TINY:
        if _is_single_file(spec.base):
            raise ValueError(f"--base {spec.base!r}: Wan loads from a diffusers folder or hub id (e.g. {DEFAULT_WAN!r}), not a single file")
        _resolve("base model", spec.base)
        cls = (read_model_index(spec.base) or {}).get("_class_name")
        if cls is not None and cls not in WAN_T2V_PIPELINES:
            raise ValueError(f"--backbone wan: --base {spec.base!r} is a {cls} model, not a Wan text-to-video model")


# ---- loading ----

def wan_dtype(spec, device: torch.device) -> torch.dtype:
    """`--dtype auto`: bf16 on CUDA (Wan's native precision; UMT5 overflows in fp16), fp32 elsewhere."""
    if spec.speed.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return spec.speed.torch_dtype(device)


def load_wan_pipeline(spec, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A `WanPipeline` for `spec` (tiny preset, diffusers folder or hub id), on `device`.

    The VAE stays in fp32 (as Wan's own examples load it); the text encoder and transformer run in `dtype`.
    """
    from diffusers import AutoencoderKLWan, WanPipeline

    from .models import TINY, _from_pretrained

    spec.check()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or wan_dtype(spec, device)
    if spec.base == TINY:
        pipe = WanPipeline(**tiny_wan_components())
        if dtype != torch.float32:  # built in fp32; the VAE stays so
            pipe.text_encoder.to(dtype=dtype)
            pipe.transformer.to(dtype=dtype)
    else:
        vae = _from_pretrained(AutoencoderKLWan, "base model", spec.base, subfolder="vae", dtype=torch.float32)
        pipe = _from_pretrained(WanPipeline, "base model", spec.base, vae=vae, dtype=dtype)
    if spec.speed.low_vram:  # what diffusers offers for Wan: VAE tiling and slicing, group offloading
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
        if device.type == "cuda":
            offload_in_blocks(pipe, device)
            return pipe
    return pipe.to(device)


def offload_in_blocks(pipe, device: torch.device) -> None:
    """`--low-vram` on CUDA: UMT5 and the transformer(s) stay in CPU memory and stream to `device` one block at a
    time (diffusers' group offloading, the copies overlapped with compute on a CUDA stream); the VAE (0.5 GB) moves
    to `device`. The peak is then about one block plus activations, where model CPU offload peaks at the whole
    UMT5-xxl (≈ 11 GiB in bf16), more than an 8 GB card holds."""
    from diffusers.hooks import apply_group_offloading

    for model in (pipe.text_encoder, pipe.transformer, getattr(pipe, "transformer_2", None)):
        if model is not None:
            apply_group_offloading(
                model, onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                num_blocks_per_group=1, use_stream=device.type == "cuda",
            )
    pipe.vae.to(device)


def wan_latent_shape(pipe, batch: int, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """(B, C, 1 + (frames − 1)/4, H/8, W/8): the shape `WanPipeline.prepare_latents` draws for `frames` = 1 + 4k."""
    channels = (pipe.transformer or pipe.transformer_2).config.in_channels
    t, s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    return (batch, channels, (frames - 1) // t + 1, height // s, width // s)


def latent_statistics(vae, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's per-channel latent mean and std as (1, C, 1, 1, 1): latents = (μ − mean) / std."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, dtype=dtype, device=device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=dtype, device=device).view(shape)
    return mean, std


def encode_wan_video(vae, video: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised latents of `video` (B, 3, F, H, W) in [-1, 1], as WanVideoToVideoPipeline makes them.

    `sample`: N(0, 1) noise of the latent shape for a posterior sample (training); None: the posterior mean.
    """
    dist = vae.encode(video.to(vae.device, vae.dtype)).latent_dist
    z = dist.mean if sample is None else dist.mean + dist.std * sample.to(dist.mean.device, dist.mean.dtype)
    mean, std = latent_statistics(vae, z.dtype, z.device)
    return (z - mean) * (1.0 / std)  # the stock pipelines' rounding: multiply by the reciprocal


def flow_shift(scheduler) -> float:
    """The sampling shift s of a flow-matching scheduler (σ' = sσ / (1 + (s − 1)σ)); 1 when it has none."""
    config = scheduler.config
    if config.get("use_flow_sigmas"):  # UniPC / DPM-Solver with flow sigmas (Wan's diffusers folders)
        return float(config.get("flow_shift") or 1.0)
    return float(config.get("shift", 1.0))  # FlowMatchEulerDiscreteScheduler
