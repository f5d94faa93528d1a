"""Seconds per finished video through the paper's inference chain: T2V VCD → Face VCD → Tiled VCD ×2.

Full size (GPU): SD-1.5-size random UNet/VAE/text encoder + v1.5-size motion adapter + a ControlNet made
from that UNet, 16 frames at 512² → 1024², 25 steps. Mid size (default on CPU): the mid-size model,
8 frames at 128² → 256², 10 steps. The models are saved to a temporary folder and loaded through the
same code as real weights; one pipeline serves all three stages, as in `magicme run`. The face stage
is given a fixed face box per frame (random weights draw no faces for a detector to find).

    python benchmarks/chain.py [--scale full|mid] [--low-vram]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from common import PeakMemory, device_name, print_table, record, save_model, timed
from magicme.face import FaceConfig, face_vcd
from magicme.generate import GenerateConfig, generate
from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec, load_pipeline
from magicme.speed import SpeedOptions
from magicme.upscale import UpscaleConfig, tiled_vcd


def measure_chain(scale: str, frames: int, size: int, steps: int, device: torch.device,
                  speed: SpeedOptions = SpeedOptions(), on_row=None) -> tuple[list[dict], float]:
    """Rows (stage, seconds, s/frame) of one finished video, and the peak memory (GiB); `on_row(row)` as each is taken."""
    rows = []

    def add(stage: str, seconds: float, per_frame: bool = True) -> None:
        rows.append({"stage": stage, "seconds": round(seconds, 2), "s_per_frame": round(seconds / frames, 3) if per_frame else None})
        if on_row:
            on_row(rows[-1])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, controlnet, width = save_model(tmp / "model", scale, device)
        identity = save_identity(tmp / "id.safetensors", torch.randn(4, width) * 0.01,
                                 IdentityInfo(token="<v*>", class_word="person", num_vectors=4, hidden_size=width))
        spec = ModelSpec(base=str(base), speed=speed)
        prompt = "a <v*> person walking on the beach"
        shared = dict(prompt=prompt, identities=[str(identity)], models=spec, steps=steps)
        box = [(size // 3, size // 4, size // 3, size // 3)]  # x, y, w, h: one face in every frame

        with PeakMemory(device) as mem:
            loaded = {}
            add("load models (once)", timed(lambda: loaded.update(pipe=load_pipeline(spec, device=device)), device), per_frame=False)
            pipe = loaded["pipe"]
            pipe.set_progress_bar_config(disable=True)
            t_gen = timed(lambda: generate(GenerateConfig(prompts=[prompt], frames=frames, height=size, width=size, steps=steps,
                                                          identities=[str(identity)], models=spec), tmp / "t2v.mp4", pipe=pipe, quiet=True), device)
            add(f"T2V VCD {frames}×{size}²", t_gen)
            t_face = timed(lambda: face_vcd(FaceConfig(**shared, face_size=size), tmp / "t2v.mp4", tmp / "face.mp4",
                                            pipe=pipe, detector=lambda frame: box, quiet=True), device)
            add(f"Face VCD (80 %), face at {size}²", t_face)
            t_up = timed(lambda: tiled_vcd(UpscaleConfig(**shared, scale=2, tile=size, controlnet=str(controlnet)),
                                           tmp / "face.mp4", tmp / "up.mp4", pipe=pipe, quiet=True), device)
            add(f"Tiled VCD ×2 → {2 * size}² (20 %), tiles of {size}", t_up)
            add(f"finished {2 * size}² video (without load)", t_gen + t_face + t_up)
    return rows, mem.peak_gib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", choices=("full", "mid"), default=None, help="default: full on CUDA, mid on CPU")
    ap.add_argument("--low-vram", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    scale = args.scale or ("full" if device.type == "cuda" else "mid")
    frames, size, steps = (16, 512, 25) if scale == "full" else (8, 128, 10)
    rows, peak = measure_chain(scale, frames, size, steps, device, SpeedOptions(low_vram=args.low_vram))
    print(f"{scale} size on {device_name(device)}{' --low-vram' if args.low_vram else ''}; peak memory {peak:.2f} GiB")
    print_table(rows)
    record("chain", rows, device, scale=scale, low_vram=args.low_vram, peak_GiB=round(peak, 3))


if __name__ == "__main__":
    main()
