"""Wan 2.x T2V speed and memory: magicme's `wan_video` (noise prior over Wan's latent frames) vs stock `WanPipeline`.

Full size (GPU): Wan 2.1 T2V 1.3B's transformer, UMT5-xxl encoder and Wan VAE built from their real configs with
random weights (they time like the real ones; no download), bf16 (VAE fp32, as Wan's examples), at the stock
setting: 81 frames, 480×832, 50 steps, guidance 5. Tiny (CPU, the test): the tiny Wan preset at a few frames.
Reports seconds per video and peak memory for stock and ours; on CUDA also ours with `--low-vram` (UMT5 and
the transformer streamed to the GPU block by block, VAE tiling and slicing).

    python benchmarks/wan.py [--scale full|tiny] [--record]

`benchmarks/gpu.py` runs it as its `wan` section (`wan_t2v`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from common import PeakMemory, device_name, print_table, record, timed

PROMPT = "a dog running on the beach at sunset"


@dataclass(frozen=True)
class WanSetting:
    frames: int = 81
    height: int = 480
    width: int = 832
    steps: int = 50
    guidance: float = 5.0


FULL = WanSetting()
TINY = WanSetting(frames=9, height=32, width=32, steps=2)


def wan_1_3b_components(device: torch.device, dtype: torch.dtype) -> dict:
    """Random weights in Wan 2.1 T2V 1.3B's shapes (diffusers' Wan-AI/Wan2.1-T2V-1.3B-Diffusers configs)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from magicme.tokenizer import tiny_umt5_tokenizer

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the device: UMT5-xxl alone is 23 GB in fp32
    try:
        with torch.device(device):
            text_encoder = UMT5EncoderModel(UMT5Config(
                vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
            ))
            transformer = WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
            )
    finally:
        torch.set_default_dtype(previous)
    with torch.device(device):
        vae = AutoencoderKLWan()  # the default config is Wan 2.1's VAE
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)
    for m in (text_encoder, transformer, vae):
        m.eval()
    return dict(tokenizer=tiny_umt5_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def wan_rows(scale: str, device: torch.device, setting: WanSetting | None = None) -> list[dict]:
    """Time and peak memory of one video: stock `WanPipeline`, ours (γ = 0.15), and on CUDA ours with --low-vram."""
    from diffusers import WanPipeline

    from magicme.wan import offload_in_blocks, tiny_wan_components
    from magicme.wan_generate import wan_video

    setting = setting or (FULL if scale == "full" else TINY)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = wan_1_3b_components(device, dtype) if scale == "full" else tiny_wan_components()
    pipe = WanPipeline(**parts).to(device)
    pipe.set_progress_bar_config(disable=True)
    call = dict(height=setting.height, width=setting.width, steps=setting.steps, guidance=setting.guidance)

    def stock():
        pipe(PROMPT, num_frames=setting.frames, height=setting.height, width=setting.width,
             num_inference_steps=setting.steps, guidance_scale=setting.guidance,
             generator=torch.Generator("cpu").manual_seed(0), output_type="np")

    def ours():
        wan_video(pipe, PROMPT, seed=0, frames=setting.frames, gamma=0.15, **call)

    runs = [("stock WanPipeline", stock), ("magicme wan_video (γ 0.15)", ours)]
    rows = []
    for name, fn in runs:
        with PeakMemory(device) as peak:
            seconds = timed(fn, device)
        rows.append(_row(scale, name, setting, seconds, peak.peak_gib, device))
    if device.type == "cuda":  # --low-vram: what load_wan_pipeline applies (the last row: offloading stays on)
        pipe.to("cpu")
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
        offload_in_blocks(pipe, device)
        with PeakMemory(device) as peak:
            seconds = timed(ours, device)
        rows.append(_row(scale, "magicme --low-vram", setting, seconds, peak.peak_gib, device))
    return rows


def wan_t2v(ctx) -> None:
    """gpu.py's Wan section: full size on a GPU, the tiny preset on a CPU (no mid-size Wan)."""
    for row in wan_rows("full" if ctx.sizes.scale == "full" else "tiny", ctx.device):
        ctx.add(row)


def _row(scale, name, setting, seconds, peak_gib, device) -> dict:
    return {"scale": scale, "run": name, "frames": setting.frames, "size": f"{setting.width}x{setting.height}",
            "steps": setting.steps, "s_per_video": round(seconds, 2), "peak_gib": round(peak_gib, 2), "device": device_name(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["full", "tiny"], default=None, help="default: full on CUDA, tiny elsewhere")
    parser.add_argument("--record", action="store_true", help="append the rows to benchmarks/results.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = args.scale or ("full" if device.type == "cuda" else "tiny")
    rows = wan_rows(scale, device)
    print_table(rows)
    if args.record:
        record("wan", rows, device)


if __name__ == "__main__":
    main()
