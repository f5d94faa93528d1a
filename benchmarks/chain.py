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
from diffusers import ControlNetModel, StableDiffusionPipeline

from common import MID, PeakMemory, device_name, print_table, record, sd15_size_components, timed
from magicme.face import FaceConfig, face_vcd
from magicme.generate import GenerateConfig, generate
from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec, load_pipeline, tiny_components
from magicme.speed import SpeedOptions
from magicme.upscale import UpscaleConfig, tiled_vcd


def save_model(folder: Path, scale: str) -> tuple[Path, Path, int]:
    """Save a random model as a diffusers folder (+ motion_adapter/, controlnet/); return paths and text width."""
    parts = sd15_size_components() if scale == "full" else tiny_components(MID)
    adapter = parts.pop("motion_adapter")
    controlnet = ControlNetModel.from_unet(parts["unet"])
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    adapter.save_pretrained(folder / "motion_adapter")
    controlnet.save_pretrained(folder / "controlnet")
    return folder, folder / "controlnet", parts["text_encoder"].config.hidden_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", choices=("full", "mid"), default=None, help="default: full on CUDA, mid on CPU")
    ap.add_argument("--low-vram", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    scale = args.scale or ("full" if device.type == "cuda" else "mid")
    frames, size, steps = (16, 512, 25) if scale == "full" else (8, 128, 10)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, controlnet, width = save_model(tmp / "model", scale)
        identity = save_identity(tmp / "id.safetensors", torch.randn(4, width) * 0.01,
                                 IdentityInfo(token="<v*>", class_word="person", num_vectors=4, hidden_size=width))
        spec = ModelSpec(base=str(base), speed=SpeedOptions(low_vram=args.low_vram))
        prompt = "a <v*> person walking on the beach"
        shared = dict(prompt=prompt, identities=[str(identity)], models=spec, steps=steps)
        box = [(size // 3, size // 4, size // 3, size // 3)]  # x, y, w, h: one face in every frame

        with PeakMemory(device) as mem:
            loaded = {}
            t_load = timed(lambda: loaded.update(pipe=load_pipeline(spec, device=device)), device)
            pipe = loaded["pipe"]
            pipe.set_progress_bar_config(disable=True)
            t_gen = timed(lambda: generate(GenerateConfig(prompts=[prompt], frames=frames, height=size, width=size, steps=steps,
                                                          identities=[str(identity)], models=spec), tmp / "t2v.mp4", pipe=pipe, quiet=True), device)
            t_face = timed(lambda: face_vcd(FaceConfig(**shared, face_size=size), tmp / "t2v.mp4", tmp / "face.mp4",
                                            pipe=pipe, detector=lambda frame: box, quiet=True), device)
            t_up = timed(lambda: tiled_vcd(UpscaleConfig(**shared, scale=2, tile=size, controlnet=str(controlnet)),
                                           tmp / "face.mp4", tmp / "up.mp4", pipe=pipe, quiet=True), device)
    rows = [
        {"stage": "load models (once)", "seconds": round(t_load, 2)},
        {"stage": f"T2V VCD {frames}×{size}²", "seconds": round(t_gen, 2)},
        {"stage": "Face VCD (80 %)", "seconds": round(t_face, 2)},
        {"stage": f"Tiled VCD ×2 → {2 * size}² (20 %)", "seconds": round(t_up, 2)},
        {"stage": "finished video (without load)", "seconds": round(t_gen + t_face + t_up, 2)},
    ]
    print(f"{scale} size on {device_name(device)}{' --low-vram' if args.low_vram else ''}; peak memory {mem.peak_gib:.2f} GiB")
    print_table(rows)
    record("chain", rows + [{"scale": scale, "low_vram": args.low_vram, "peak_GiB": round(mem.peak_gib, 3)}], device)


if __name__ == "__main__":
    main()
