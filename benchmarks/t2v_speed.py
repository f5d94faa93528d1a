"""T2V speed and memory: magicme's speed options vs stock `AnimateDiffPipeline` with default settings.

Full size (GPU): SD-1.5-size UNet + AnimateDiff v1.5-size motion adapter built from their real configs
with random weights, 16 frames, 512×512, 25 DDIM steps. Mid size (default on CPU): the mid-size model,
16 frames, 128×128, 4 steps, so the script is checked in CI-sized time. Reports seconds per video,
peak memory, the ratio ours/stock, `--low-vram` peak memory, and the UNet's achieved TFLOP/s.

    python benchmarks/t2v_speed.py [--scale full|mid] [--compile] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import AnimateDiffPipeline
from torch.utils.flop_counter import FlopCounterMode

from common import MID, PeakMemory, device_name, print_table, record, sd15_size_components, timed
from magicme.generate import generate_video
from magicme.models import tiny_components
from magicme.speed import SpeedOptions, apply_speed_options

# Dense fp16/bf16 tensor-core peaks (vendor data sheets), TFLOP/s.
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2}


def components(scale: str) -> dict:
    return sd15_size_components() if scale == "full" else tiny_components(MID)


class UNetTimer:
    """Accumulates wall time spent inside the UNet's forward (synchronised on CUDA)."""

    def __init__(self, unet, device):
        self.total, self.calls, self.device = 0.0, 0, device
        unet.register_forward_pre_hook(self._start)
        unet.register_forward_hook(self._stop)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self, *_):
        self._sync()
        self._t = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.total += time.perf_counter() - self._t
        self.calls += 1


def unet_flops(pipe, frames: int, size: int) -> int:
    """FLOPs of one UNet call with classifier-free guidance (batch 2 × frames)."""
    unet = pipe.unet
    lat = size // pipe.vae_scale_factor
    dev, dt = unet.device, unet.dtype
    x = torch.randn(2, 4, frames, lat, lat, device=dev, dtype=dt)
    text = torch.randn(2 * frames, 77, unet.config.cross_attention_dim, device=dev, dtype=dt)  # the pipeline repeats prompts per frame
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500, device=dev), encoder_hidden_states=text)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", choices=("full", "mid"), default=None, help="default: full on CUDA, mid on CPU")
    ap.add_argument("--compile", action="store_true", help="also torch.compile our UNet")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    scale = args.scale or ("full" if device.type == "cuda" else "mid")
    frames, size, steps = (16, 512, 25) if scale == "full" else (16, 128, 4)
    prompt = "a dog running on the beach"

    stock = AnimateDiffPipeline(**components(scale)).to(device)  # stock defaults: fp32 weights, eager
    stock.set_progress_bar_config(disable=True)

    ours_opts = SpeedOptions(compile=args.compile)
    ours = AnimateDiffPipeline(**components(scale)).to(ours_opts.torch_dtype(device))
    apply_speed_options(ours, ours_opts, device)
    ours.set_progress_bar_config(disable=True)
    timer = UNetTimer(ours.unet, device)
    flops = unet_flops(ours, frames, size)

    def run_stock():
        stock(prompt=prompt, num_frames=frames, height=size, width=size, num_inference_steps=steps,
              generator=torch.Generator().manual_seed(0), output_type="np")

    def run_ours():
        generate_video(ours, prompt, seed=0, frames=frames, height=size, width=size, steps=steps)

    run_ours(), run_stock()  # warm-up (and compilation)
    timer.total = timer.calls = 0
    t_stock, t_ours, m_stock, m_ours = [], [], 0.0, 0.0
    for _ in range(args.repeats):
        with PeakMemory(device) as m:
            t_stock.append(timed(run_stock, device))
        m_stock = max(m_stock, m.peak_gib)
        with PeakMemory(device) as m:
            t_ours.append(timed(run_ours, device))
        m_ours = max(m_ours, m.peak_gib)
    del stock
    achieved = flops * timer.calls / timer.total / 1e12

    low = AnimateDiffPipeline(**components(scale)).to(SpeedOptions().torch_dtype(device))
    apply_speed_options(low, SpeedOptions(low_vram=True), device)
    low.set_progress_bar_config(disable=True)
    with PeakMemory(device) as m:
        t_low = timed(lambda: generate_video(low, prompt, seed=0, frames=frames, height=size, width=size, steps=steps), device)

    name = device_name(device)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows = [
        {"variant": "stock AnimateDiffPipeline", "s_per_video": round(statistics.median(t_stock), 2), "peak_GiB": round(m_stock, 2)},
        {"variant": f"magicme ({ours_opts.torch_dtype(device)}{', compile' if args.compile else ''})",
         "s_per_video": round(statistics.median(t_ours), 2), "peak_GiB": round(m_ours, 2)},
        {"variant": "magicme --low-vram", "s_per_video": round(t_low, 2), "peak_GiB": round(m.peak_gib, 2)},
    ]
    print(f"{scale} size: {frames} frames {size}x{size}, {steps} steps on {name}")
    print_table(rows)
    ratio = statistics.median(t_ours) / statistics.median(t_stock)
    print(f"ours / stock time: {ratio:.3f}  (target <= 0.5 on GPU)")
    print(f"UNet: {flops / 1e12:.2f} TFLOP per call, achieved {achieved:.1f} TFLOP/s"
          + (f" = {100 * achieved / peak:.0f}% of {peak} peak" if peak else ""))
    record("t2v_speed", rows + [{"scale": scale, "ratio": round(ratio, 4), "unet_tflops_achieved": round(achieved, 3),
                                 "unet_tflop_per_call": round(flops / 1e12, 4), "peak_tflops": peak}], device)


if __name__ == "__main__":
    main()
