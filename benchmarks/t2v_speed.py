"""T2V speed and memory: stock `AnimateDiffPipeline` against magicme's speed options, side by side.

Variants (the issue's letters): (a) stock defaults (fp32); (b) stock at its best documented settings
(diffusers' "Accelerate inference" guide without torch.compile: fp16 weights, SDPA (its default), VAE
slicing off (its default)); (c) magicme's defaults; (d) `--compile`; (e) `--low-vram`; plus the
ablations `gpu.py` times (each default option switched off) and `--fp8`.
Full size (GPU): SD-1.5-size UNet + AnimateDiff v1.5-size motion adapter from their real configs with
random weights, 16 frames, 512×512, 25 DDIM steps, CFG 7.5. Mid size (default on CPU): the mid-size
model, 16 frames, 128×128, 4 steps. Reports seconds per video, peak memory, the UNet's achieved TFLOP/s
(FLOPs counted by `FlopCounterMode`) against the GPU's dense peak, and host syncs per denoising step.

    python benchmarks/t2v_speed.py [--scale full|mid] [--variants b c a e] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common import PeakMemory, dense_peak_tflops, device_name, print_table, record, sync, t2v_pipeline, timed, unet_flops
from magicme.generate import generate_video
from magicme.speed import SpeedOptions, apply_speed_options

PROMPT = "a dog running on the beach"


@dataclass(frozen=True)
class Clip:
    frames: int = 16
    size: int = 512
    steps: int = 25
    guidance: float = 7.5


FULL_CLIP, MID_CLIP = Clip(), Clip(frames=16, size=128, steps=4)


@dataclass(frozen=True)
class Variant:
    label: str
    stock_dtype: torch.dtype | None = None  # a stock pipeline in this dtype; None: magicme with `options`
    options: SpeedOptions = SpeedOptions()
    post: Callable[[object], None] | None = None  # applied to magicme's pipeline after its options (another library's layers)


def variants(device: torch.device) -> dict[str, Variant]:
    half = torch.float16 if device.type == "cuda" else torch.float32  # fp16 convolutions crawl on a CPU
    return {
        "a": Variant("(a) stock defaults (fp32)", stock_dtype=torch.float32),
        "b": Variant(f"(b) stock best documented ({str(half)[6:]}, SDPA, no VAE slicing)", stock_dtype=half),
        "c": Variant("(c) magicme default", options=SpeedOptions()),
        "d": Variant("(d) magicme --compile", options=SpeedOptions(compile=True)),
        "e": Variant("(e) magicme --low-vram", options=SpeedOptions(low_vram=True)),
    }


def build(v: Variant, scale: str, device: torch.device):
    if v.stock_dtype is not None:
        return t2v_pipeline(scale, device, v.stock_dtype)
    pipe = t2v_pipeline(scale, device, v.options.torch_dtype(device))  # built where it runs: fast; --low-vram offloads it
    pipe = apply_speed_options(pipe, v.options, device)
    if v.post is not None:
        v.post(pipe)
    return pipe


def run(pipe, v: Variant, clip: Clip, steps: int | None = None):
    """One video, (F, H, W, 3) in [0, 1]: the stock call, or `generate_video` (what `magicme generate` runs)."""
    steps = steps or clip.steps
    if v.stock_dtype is not None:
        return pipe(prompt=PROMPT, num_frames=clip.frames, height=clip.size, width=clip.size, num_inference_steps=steps,
                    guidance_scale=clip.guidance, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    return generate_video(pipe, PROMPT, seed=0, frames=clip.frames, height=clip.size, width=clip.size, steps=steps,
                          guidance=clip.guidance)


@torch.no_grad()
def unet_seconds(pipe, clip: Clip, device: torch.device, calls: int = 3) -> float:
    """Seconds per UNet call on the pipeline's inputs (CFG batch 2, the prompt repeated per frame)."""
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    lat = clip.size // pipe.vae_scale_factor
    dtype = pipe.text_encoder.dtype
    x = torch.randn(2, unet.config.in_channels, clip.frames, lat, lat, generator=g).to(device, dtype)
    text = torch.randn(2 * clip.frames, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.tensor(500, device=device)

    def call():  # as the pipeline calls it, so a compiled UNet is not traced again
        return unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=None, added_cond_kwargs=None).sample

    call()
    sync(device)
    return timed(lambda: [call() for _ in range(calls)], device) / calls


def host_syncs(pipe, v: Variant, clip: Clip) -> tuple[float, dict[str, int]]:
    """Host syncs per denoising step (CUDA's sync debug mode), counted between the first and last UNet call, by file."""
    import warnings
    from collections import Counter

    marks: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hooks = [pipe.unet.register_forward_pre_hook(lambda *a: marks.append(len(caught))),
                 pipe.unet.register_forward_hook(lambda *a: marks.append(len(caught)))]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(pipe, v, clip, steps=4)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            for h in hooks:
                h.remove()
    syncs = [w for w in caught[marks[0]:marks[-1]] if "synchroniz" in str(w.message)]
    by_file = Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}" for w in syncs)
    return len(syncs) / 4, dict(by_file)


def measure(v: Variant, scale: str, clip: Clip, device: torch.device, repeats: int = 2, unet: bool = True,
            frames_out: dict | None = None) -> dict:
    """Build, warm up (compile), time `repeats` videos; a table row. `frames_out[label]` gets the video."""
    pipe = build(v, scale, device)
    first = timed(lambda: run(pipe, v, clip, steps=min(2, clip.steps)), device)  # warm-up: cuDNN plans, compilation
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            out = {}
            times.append(timed(lambda: out.update(video=run(pipe, v, clip)), device))
    row = {"variant": v.label, "s_per_video": round(statistics.median(times), 3), "peak_GiB": round(mem.peak_gib, 2)}
    if v.options.compile:
        row["first_call_s"] = round(first, 1)
    if frames_out is not None:
        frames_out[v.label] = out["video"]
    if unet and not v.options.low_vram:  # offloaded weights would time the transfers
        row["unet_s_per_call"] = round(unet_seconds(pipe, clip, device), 4)
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_throughput(rows: list[dict], flops: int, device: torch.device) -> None:
    """UNet TFLOP/s and its share of the GPU's dense peak, in place."""
    peak = dense_peak_tflops(device_name(device)) if device.type == "cuda" else None
    for row in rows:
        if "unet_s_per_call" in row:
            achieved = flops / row["unet_s_per_call"] / 1e12
            row["unet_TFLOP_s"] = float(f"{achieved:.3g}")
            if peak:
                row["pct_of_peak"] = round(100 * achieved / peak, 1)


def add_ratio(rows: list[dict], base_label: str, key: str = "x_b") -> None:
    """Each row's time over the `base_label` row's (×(b): the issue's targets are in these units)."""
    base = next((r["s_per_video"] for r in rows if r["variant"] == base_label), None)
    for row in rows:
        if base:
            row[key] = round(row["s_per_video"] / base, 3)


def motion_unet_config(scale: str) -> dict:
    """The motion UNet's config at `scale`, built on the meta device (no weights)."""
    from diffusers import UNetMotionModel

    from common import components

    with torch.device("meta"):
        parts = components(scale, "meta")
        return dict(UNetMotionModel.from_unet2d(parts["unet"], parts["motion_adapter"], load_weights=False).config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", choices=("full", "mid"), default=None, help="default: full on CUDA, mid on CPU")
    ap.add_argument("--variants", nargs="+", default=["b", "c", "a", "e"], choices=list("abcde"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    scale = args.scale or ("full" if device.type == "cuda" else "mid")
    clip = FULL_CLIP if scale == "full" else MID_CLIP
    table = variants(device)
    rows = [measure(table[k], scale, clip, device, args.repeats) for k in args.variants]
    flops = unet_flops(motion_unet_config(scale), clip.frames, clip.size, clip.size)
    add_throughput(rows, flops, device)
    add_ratio(rows, table["b"].label)
    print(f"{scale} size: {clip.frames} frames {clip.size}x{clip.size}, {clip.steps} steps on {device_name(device)};"
          f" UNet {flops / 1e12:.3f} TFLOP per call")
    print_table(rows)
    record("t2v_speed", rows, device, scale=scale, clip=asdict(clip), unet_tflop_per_call=round(flops / 1e12, 4))


if __name__ == "__main__":
    main()
