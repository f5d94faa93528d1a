"""Face VCD and Tiled VCD: seconds and peak memory per frame on the mid-size random model, and the tile-batching gain.

Timings run alternately in one process on the same components, so machine noise hits both sides alike:
- Face VCD (`face_vcd`: read, detect (injected), track, crop, resize, noise prior, denoise, paste, write)
  against stock `AnimateDiffVideoToVideoPipeline` denoising a face clip of the same size — the ratio is
  what Face VCD costs around the denoising;
- Tiled VCD (`tiled_vcd`: Lanczos ×2, ControlNet Tile, 2×2 overlapping tiles) with all tiles in one
  batch against one tile at a time.

Peak memory is measured for each run in a fresh process (the allocator never gives memory back, so a
shared process would hide later peaks): peak GPU allocation on CUDA, peak RSS growth over the loaded
model on CPU.

    python benchmarks/v2v.py [--frames 8] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
import torch
from diffusers import AnimateDiffVideoToVideoPipeline

from common import MID, PeakMemory, print_table, record, t2v_pipeline, timed
from magicme.face import FaceConfig, face_vcd
from magicme.upscale import UpscaleConfig, tiled_vcd, tiny_controlnet
from magicme.video import write_video

RUNS = ("face_vcd", "stock_face_clip", "tiled_1", "tiled_batched")


def build_runs(frames: int, device: torch.device, tmp: Path) -> dict:
    """The four workloads as closures over one mid-size pipeline."""
    pipe = t2v_pipeline("mid", device)
    face = MID.resolution  # 256: the model's native side
    tiny_controlnet(MID).save_pretrained(tmp / "controlnet")
    rng = np.random.default_rng(0)

    # Face VCD: a 512×512 clip with one 96 px face moving right, denoised at 256 (80 % of 10 steps)
    video = write_video(rng.integers(0, 256, (frames, 512, 512, 3), dtype=np.uint8), tmp / "face_in")
    face_cfg = FaceConfig(prompt="a person", steps=10, face_size=face)

    def face_vcd_run():
        boxes = iter([(200.0 + 4 * i, 180.0, 96.0, 96.0) for i in range(frames)])
        face_vcd(face_cfg, video, tmp / "face_out", pipe=pipe, detector=lambda f: [next(boxes)], quiet=True)

    v2v = AnimateDiffVideoToVideoPipeline.from_pipe(pipe)
    v2v.set_progress_bar_config(disable=True)
    face_clip = rng.random((frames, face, face, 3), dtype=np.float32)

    def stock_face_run():
        v2v(video=[face_clip], prompt="a person", strength=0.8, num_inference_steps=10, height=face, width=face,
            generator=torch.Generator().manual_seed(0), output_type="np")

    # Tiled VCD: 96×96 → ×2 = 192×192, tiles of 128 with 64 overlap → 2×2 tiles, 20 % of 20 steps
    small = write_video(rng.integers(0, 256, (frames, 96, 96, 3), dtype=np.uint8), tmp / "tiled_in")

    def tiled(batch: int):
        cfg = UpscaleConfig(prompt="a person", steps=20, tile=128, overlap=64, tile_batch=batch, controlnet=str(tmp / "controlnet"))
        return lambda: tiled_vcd(cfg, small, tmp / f"tiled_out_{batch}", pipe=pipe, quiet=True)

    return dict(zip(RUNS, (face_vcd_run, stock_face_run, tiled(1), tiled(4))))


def peak_memory(run: str, frames: int, device: torch.device) -> float:
    """Peak memory (GiB) of one run of `run`, measured in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", run, "--frames", str(frames), "--device", str(device)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_gib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-of", choices=RUNS, help=argparse.SUPPRESS)  # internal: one run, print its peak
    args = ap.parse_args()
    device = torch.device(args.device)
    logging.getLogger("magicme").setLevel(logging.ERROR)  # the Lanczos notice, once per run
    tmp = Path(tempfile.mkdtemp(prefix="magicme-bench-"))
    runs = build_runs(args.frames, device, tmp)

    if args.memory_of:
        base = psutil.Process().memory_info().rss / 2**30 if device.type == "cpu" else 0.0
        with PeakMemory(device) as mem:
            runs[args.memory_of]()
        print(json.dumps({"peak_gib": mem.peak_gib - base}))
        return

    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in RUNS}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    face_ratio = statistics.median(a / b for a, b in zip(times["face_vcd"], times["stock_face_clip"]))
    batch_gain = statistics.median(a / b for a, b in zip(times["tiled_1"], times["tiled_batched"]))
    labels = {
        "face_vcd": "Face VCD (ours), 512² clip, face at 256",
        "stock_face_clip": "stock v2v pipeline, 256² face clip",
        "tiled_1": "Tiled VCD ×2, 4 tiles one at a time",
        "tiled_batched": "Tiled VCD ×2, 4 tiles batched",
    }
    rows = [
        {
            "run": labels[name],
            "frames": args.frames,
            "s_per_frame": round(statistics.median(times[name]) / args.frames, 3),
            "peak_gib": round(peak_memory(name, args.frames, device), 3),
        }
        for name in RUNS
    ]
    print_table(rows)
    print(f"Face VCD / stock denoise of the face clip: {face_ratio:.3f}×; tile batching speed-up: {batch_gain:.2f}×")
    rows.append({"face_vcd_over_stock": round(face_ratio, 4), "tile_batching_speedup": round(batch_gain, 3)})
    record("v2v", rows, device)


if __name__ == "__main__":
    main()
