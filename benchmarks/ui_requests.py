"""Seconds per web-UI request: the UI's cached pipeline against loading the model for every request.

A mid-size random model is saved as a diffusers folder (+ motion_adapter/) and named by path, as a
user names real weights. Three ways to answer the same generate request, alternately in one process:

- stock: `AnimateDiffPipeline.from_pretrained` + one call, per request (what a naive app does);
- generate: `magicme.generate.generate` without `pipe=`, per request (the CLI's path);
- ui: `Workspace.generate`, which loads the pipeline once per `ModelSpec` and reuses it;
- ui_preview: the same with the live preview (VAE decode of 4 frames) every other step.

    python benchmarks/ui_requests.py [--requests 4] [--frames 8] [--size 128] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from diffusers import AnimateDiffPipeline, MotionAdapter

from common import MID, print_table, record, timed
from magicme.generate import GenerateConfig, generate
from magicme.models import ModelSpec, save_tiny_model
from magicme.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "model", MID)
        spec = ModelSpec(base=str(model))
        cfg = GenerateConfig(prompts=["a dog running"], frames=args.frames, height=args.size, width=args.size,
                             steps=args.steps, models=spec)
        ws = Workspace(tmp / "ui", device=args.device)

        def stock():
            adapter = MotionAdapter.from_pretrained(model / "motion_adapter")
            pipe = AnimateDiffPipeline.from_pretrained(model, motion_adapter=adapter).to(device)
            pipe.set_progress_bar_config(disable=True)
            pipe(prompt="a dog running", num_frames=args.frames, height=args.size, width=args.size,
                 num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0), output_type="np")

        def cli():
            generate(cfg, tmp / "cli.mp4", quiet=True, device=args.device)

        def ui():
            ws.generate(cfg)

        def ui_preview():
            ws.generate(cfg, preview_every=2)

        times = {"stock": [], "generate": [], "ui": [], "ui_preview": []}
        for _ in range(args.requests):
            for name, fn in (("stock", stock), ("generate", cli), ("ui", ui), ("ui_preview", ui_preview)):
                times[name].append(timed(fn, device))
    # the UI's first request loads the model like the others; the rest reuse it
    rows = [
        {
            "frames": args.frames, "size": args.size, "steps": args.steps, "requests": args.requests,
            "stock_s_per_request": round(statistics.median(times["stock"]), 3),
            "generate_s_per_request": round(statistics.median(times["generate"]), 3),
            "ui_first_s": round(times["ui"][0], 3),
            "ui_s_per_request": round(statistics.median(times["ui"][1:]), 3),
            "speedup_vs_stock": round(statistics.median(times["stock"]) / statistics.median(times["ui"][1:]), 2),
            "ui_preview_s_per_request": round(statistics.median(times["ui_preview"]), 3),
            "previews": args.steps // 2 - (args.steps % 2 == 0),  # every other step, not the last
        }
    ]
    print_table(rows)
    record("ui_requests", rows, device)


if __name__ == "__main__":
    main()
