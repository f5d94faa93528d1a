"""Overhead of our `generate_video` over stock `AnimateDiffPipeline` on the same mid-size random model.

Both run alternately in one process on the same components (16 frames, 256×256, 4 DDIM steps), so
machine noise hits both alike; we report the median time ratio (target: within 3 %).

    python benchmarks/t2v_overhead.py [--repeats 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from diffusers import AnimateDiffPipeline

from common import MID, print_table, record, timed
from magicme.generate import generate_video
from magicme.models import tiny_components


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)

    pipe = AnimateDiffPipeline(**tiny_components(MID)).to(device)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_frames=args.frames, height=args.size, width=args.size, num_inference_steps=args.steps)

    def stock():
        pipe(prompt="a dog running", generator=torch.Generator().manual_seed(0), output_type="np", **kw)

    def ours():
        generate_video(
            pipe, "a dog running", seed=0, frames=args.frames, height=args.size, width=args.size, steps=args.steps, gamma=0.15
        )

    ours(), stock()  # warm-up
    t_stock, t_ours = [], []
    for _ in range(args.repeats):
        t_stock.append(timed(stock, device))
        t_ours.append(timed(ours, device))
    ratio = statistics.median(o / s for o, s in zip(t_ours, t_stock))
    rows = [
        {
            "frames": args.frames,
            "size": args.size,
            "steps": args.steps,
            "stock_s": round(statistics.median(t_stock), 3),
            "ours_s": round(statistics.median(t_ours), 3),
            "ratio": round(ratio, 4),
        }
    ]
    print_table(rows)
    record("t2v_overhead", rows, device)


if __name__ == "__main__":
    main()
