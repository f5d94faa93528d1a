"""Every stage once at SD-1.5's real model sizes (random weights), at a small spatial size, with peak memory.

The tiny preset hides what only real sizes show: hard-coded sizes, dtype mismatches, the 77-token limit
with 4 identity vectors, memory. This builds SD-1.5's real configs (`models.sd15_components`: UNet 859 M,
CLIP ViT-L/14 text encoder with a 49,408-token vocabulary, VAE, the v1.5-2 motion adapter, a ControlNet of
the UNet's shape) and runs prepare → one training step → generate (with a long prompt) → v2v → face →
upscale through magicme's own stage functions, on the CPU, once per dtype, each dtype in a fresh child
process so that its peak resident memory is its own.

    python benchmarks/real_size.py [--dtype fp32 --dtype bf16] [--size 64] [--frames 2] [--record]

Prints one row per stage: seconds and the process's peak RSS so far. `--record` appends them to
benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HUB_FORM = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # a name for the records; nothing is downloaded
LONG_PROMPT = "a photo of a <v*> toy " + ", ".join(
    ["standing on a sunny beach with waves crashing behind", "cinematic lighting", "highly detailed", "masterpiece",
     "best quality", "soft light", "sharp focus", "warm colours", "golden hour", "bokeh background", "film grain",
     "35mm", "award winning photograph", "trending", "ultra realistic", "vivid"]
)


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_stages(dtype_name: str, size: int, frames: int, work: Path) -> list[dict]:
    """All stages in this process; one row per stage."""
    import numpy as np
    import torch
    from diffusers import ControlNetModel, DDPMScheduler

    from magicme.demo import write_sample_identity
    from magicme.face import FaceConfig, face_vcd
    from magicme.generate import GenerateConfig, generate
    from magicme.identity import save_identity
    from magicme.models import ModelSpec, assemble_pipeline, sd15_components
    from magicme.prepare import PrepareConfig, load_identity_set, prepare_identity_set
    from magicme.segment import SegmenterConfig
    from magicme.speed import DTYPES
    from magicme.train import IdTrainer, TrainConfig
    from magicme.upscale import UpscaleConfig, tiled_vcd
    from magicme.v2v import V2VConfig, v2v

    dtype = DTYPES[dtype_name]
    rows: list[dict] = []
    t0 = time.perf_counter()

    def row(stage: str, **extra) -> None:
        nonlocal t0
        rows.append({"dtype": dtype_name, "stage": stage, "seconds": round(time.perf_counter() - t0, 1),
                     "peak_rss_gib": round(peak_gib(), 2), **extra})
        print(json.dumps(rows[-1]), flush=True)
        t0 = time.perf_counter()

    parts = sd15_components(dtype)
    counts = {k: round(sum(p.numel() for p in parts[k].parameters()) / 1e6, 1) for k in ("unet", "text_encoder", "vae", "motion_adapter")}
    row("build", params_m=counts, vocab=len(parts["tokenizer"]))

    write_sample_identity(work / "photos", count=2, size=size)
    prepared = prepare_identity_set(PrepareConfig(images=work / "photos", class_word="toy", out=work / "prepared",
                                                  resolution=size, segmenter=SegmenterConfig(method="grabcut")))
    row("prepare")

    # one training step of the ID module on the 2D UNet, mixed precision as `train` runs it (text encoder fp32)
    import copy

    spec = ModelSpec(base=HUB_FORM, speed=ModelSpec().speed.__class__(dtype=dtype_name))
    cfg = TrainConfig(data=prepared, token="<v*>", class_word="toy", steps=1, batch_size=1, checkpoint_every=0,
                      validation_images=0, out=work / "id.safetensors",
                      mixed_precision="no" if dtype == torch.float32 else dtype_name, models=spec)
    text_encoder = parts["text_encoder"]
    train_parts = dict(vae=parts["vae"], unet=parts["unet"], text_encoder=copy.deepcopy(text_encoder).float(),
                       tokenizer=copy.deepcopy(parts["tokenizer"]), noise_scheduler=DDPMScheduler.from_config(parts["scheduler"].config))
    for m in (train_parts["vae"], train_parts["unet"], train_parts["text_encoder"]):
        m.requires_grad_(False)
    images, masks, _ = load_identity_set(prepared, size)
    trainer = IdTrainer(cfg, train_parts, images, masks, "toy", torch.device("cpu"))
    loss = trainer.step(0)
    identity = save_identity(cfg.out, trainer.id_tokens.embeddings, trainer.identity_info(1))
    trainer.id_tokens.remove()
    del trainer, train_parts
    gc.collect()
    row("train_step", loss=round(loss, 4))

    # ControlNet Tile of the UNet's shape, saved so Tiled VCD loads it as a user's local folder
    controlnet = ControlNetModel.from_unet(parts["unet"]).to(dtype)
    controlnet.save_pretrained(work / "controlnet")
    del controlnet
    pipe = assemble_pipeline(parts, spec, dtype)  # load_pipeline's own assembly: one UNetMotionModel
    gc.collect()
    pipe.set_progress_bar_config(disable=True)
    row("pipeline")

    gen = GenerateConfig(prompts=[LONG_PROMPT], frames=frames, height=size, width=size, steps=2, guidance=7.5,
                         identities=[str(identity)], models=spec)
    (t2v,) = generate(gen, work / "t2v.mp4", pipe=pipe, quiet=True)
    row("generate")

    shared = dict(prompt="a photo of a <v*> toy", steps=2, identities=[str(identity)], models=spec)
    v2v(V2VConfig(**shared, strength=0.5), t2v, work / "v2v.mp4", pipe=pipe, quiet=True)
    row("v2v")

    box = [(size * 0.25, size * 0.25, size * 0.5, size * 0.5)]
    face_vcd(FaceConfig(**shared, strength=0.8, face_size=size), t2v, work / "face.mp4", pipe=pipe,
             detector=lambda frame: box, quiet=True)
    row("face")

    up = UpscaleConfig(**shared, strength=0.5, scale=2, tile=size, overlap=size // 8, controlnet=str(work / "controlnet"))
    out = tiled_vcd(up, t2v, work / "upscaled.mp4", pipe=pipe, quiet=True)
    from magicme.video import read_video

    assert read_video(out).shape[1:3] == (2 * size, 2 * size)
    assert np.isfinite(read_video(out)).all()
    row("upscale")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16"], help="repeat (default: fp32 and bf16)")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (multiple of 64)")
    p.add_argument("--frames", type=int, default=2)
    p.add_argument("--record", action="store_true", help="append the rows to benchmarks/results.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one dtype in this process
        with tempfile.TemporaryDirectory() as tmp:
            rows = run_stages(args.child, args.size, args.frames, Path(tmp))
        print("ROWS " + json.dumps(rows))
        return 0
    rows = []
    for dtype in args.dtype or ["fp32", "bf16"]:
        cmd = [sys.executable, __file__, "--child", dtype, "--size", str(args.size), "--frames", str(args.frames)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            return done.returncode
        rows += json.loads(next(line[5:] for line in done.stdout.splitlines() if line.startswith("ROWS ")))
    for r in rows:
        print(f"{r['dtype']:>5} {r['stage']:<11} {r['seconds']:>7.1f} s   peak RSS {r['peak_rss_gib']:.2f} GiB")
    if args.record:
        sys.path.insert(0, str(Path(__file__).parent))
        import torch

        from common import record

        record("real_size", rows, torch.device("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
