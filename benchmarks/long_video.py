"""Long videos: seconds and peak working memory per clip length, ours against stock diffusers.

On one mid-size random model in one process, at 16, 32 and 64 frames (256×256, DDIM, CFG 7.5):
- `stock one pass`: `AnimateDiffPipeline` over all frames at once (motion positions widened to 64);
- `stock FreeNoise`: diffusers' `enable_free_noise(16, 4)` (its shuffled noise), no split inference;
- `magicme`: `generate_video` — noise prior over all frames, FreeNoise windows past 16 frames,
  spatial layers run one 16-frame window at a time.
Peak memory is the rise above the memory held before the call (GPU: allocated; CPU: process RSS
sampled every 5 ms, after returning freed heap to the OS). Time should grow linearly with frames
and our peak stay flat. On CPU `s_per_frame` uses the process's CPU time (other load on a shared
machine stretches wall time, not CPU time); on CUDA, wall time.

    python benchmarks/long_video.py [--frames 16 32 64] [--size 256] [--steps 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from diffusers import AnimateDiffPipeline

from common import MID, PeakMemory, held_gib, print_table, record, timed
from magicme.generate import generate_video
from magicme.long_video import plan_windows
from magicme.models import tiny_components

PROMPT = "a dog running on the beach"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="keep the fastest (least disturbed) of these runs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: no OpenMP spin-waits in the CPU time)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)

    pipe = AnimateDiffPipeline(**tiny_components(replace(MID, motion_max_seq_length=max(args.frames)))).to(device)
    pipe.set_progress_bar_config(disable=True)
    common = dict(height=args.size, width=args.size)

    def stock_one_pass(frames):
        pipe(prompt=PROMPT, num_frames=frames, num_inference_steps=args.steps, output_type="np",
             generator=torch.Generator().manual_seed(0), **common)

    def stock_free_noise(frames):
        pipe.enable_free_noise(context_length=16, context_stride=4)
        try:
            stock_one_pass(frames)
        finally:
            pipe.disable_free_noise()

    def ours(frames):
        generate_video(pipe, PROMPT, seed=0, frames=frames, steps=args.steps, gamma=0.15,
                       windows=plan_windows(frames, None, 4, "pyramid"), **common)

    variants = {"stock one pass": stock_one_pass, "stock FreeNoise": stock_free_noise, "magicme": ours}
    for fn in variants.values():  # warm-up
        fn(min(args.frames))
    rows = []
    for frames in args.frames:
        for name, fn in variants.items():
            if name == "stock FreeNoise" and frames <= 16:
                continue  # one window: the same work as one pass
            seconds, cpu_seconds, rise = [], [], 0.0
            for _ in range(args.repeats):
                before = held_gib(device)
                cpu = time.process_time()
                with PeakMemory(device) as mem:
                    seconds.append(timed(lambda: fn(frames), device))
                cpu_seconds.append(time.process_time() - cpu)
                rise = max(rise, mem.peak_gib - before)
            # on a shared CPU the process's own CPU time is steadier than wall time
            best = min(cpu_seconds) if device.type == "cpu" else min(seconds)
            rows.append({
                "variant": name, "frames": frames, "wall_s": round(min(seconds), 2), "cpu_s": round(min(cpu_seconds), 2),
                "s_per_frame": round(best / frames, 3), "peak_rise_GiB": round(rise, 3),
            })
            print_table(rows[-1:])
    print()
    print_table(rows)
    settings = {"size": args.size, "steps": args.steps, "scale": "mid", "repeats": args.repeats, "threads": torch.get_num_threads()}
    record("long_video", [settings, *rows], device)


if __name__ == "__main__":
    main()
