"""Time per training step: our ID-module step vs a plain diffusers textual-inversion step.

Both run in this process on the same random mid-size SD-shaped model, the same images, batch size
and resolution, interleaved so that machine load hits both alike. The plain step is what diffusers'
textual-inversion example does: the whole token-embedding matrix trains under AdamW, the loss is the
unmasked ε-MSE, and the rows of the old tokens are copied back after each step. Ours adds the
augmentation, the mask and the noise offset, and trains only the K new rows.

Peak memory: CUDA's allocator peak on a GPU; on a CPU the peak resident-set growth over 3 steps of one
variant, each in a fresh child process (torch's CPU allocations are not otherwise tracked).

    python benchmarks/train_step.py [--steps 8] [--batch-size 4] [--resolution 128] [--device cpu]

Appends one JSON record to benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import record, sync, training_components
from magicme.demo import write_sample_identity
from magicme.prepare import PrepareConfig, load_identity_set, prepare_identity_set
from magicme.segment import SegmenterConfig
from magicme.train import IdTrainer, TrainConfig, TEMPLATES


VARIANTS = ("ours (ID module)", "plain diffusers TI")


def identity_set(folder: Path, resolution: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """A prepared sample identity (4 drawn photos, GrabCut masks): its folder, images and masks."""
    photos = write_sample_identity(folder / "photos", count=4, size=resolution * 3 // 2)
    prepared = prepare_identity_set(
        PrepareConfig(images=photos, class_word="toy", out=folder / "prep", resolution=resolution, segmenter=SegmenterConfig(method="grabcut"))
    )
    images, masks, _ = load_identity_set(prepared, resolution)
    return prepared, images, masks


def id_training_seconds(scale: str, resolution: int, batch: int, steps: int, device: torch.device, folder: Path) -> list[float]:
    """Seconds of each of `steps` ID-training steps (`IdTrainer.step`, mixed precision auto) on a random `scale` model."""
    from magicme.train import autocast_dtype

    prepared, images, masks = identity_set(folder, resolution)
    parts = training_components(scale, resolution, device, autocast_dtype(device, "auto") or torch.float32)
    trainer = IdTrainer(TrainConfig(data=prepared, batch_size=batch, resolution=resolution), parts, images, masks, "toy", device)
    times = []
    for k in range(steps):
        sync(device)
        t0 = time.perf_counter()
        trainer.step(k)  # returns the loss as a float: the step's own sync
        times.append(time.perf_counter() - t0)
    return times


class PlainTextualInversion:
    """diffusers' textual-inversion example step: whole embedding matrix under AdamW, old rows restored after."""

    def __init__(self, parts: dict, images: np.ndarray, token: str, num_vectors: int, class_word: str, batch: int, lr: float, device):
        self.p, self.images, self.batch, self.device = parts, images, batch, device
        tok, te = parts["tokenizer"], parts["text_encoder"]
        tokens = [token] + [f"{token}_{i}" for i in range(1, num_vectors)]
        tok.add_tokens(tokens)
        ids = tok.convert_tokens_to_ids(tokens)
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        emb = te.get_input_embeddings()
        with torch.no_grad():
            emb.weight[ids] = emb.weight[tok(class_word, add_special_tokens=False).input_ids].mean(0)
        emb.weight.requires_grad_(True)
        self.keep = torch.ones(len(tok), dtype=torch.bool)
        self.keep[ids] = False
        self.orig = emb.weight.detach().clone()
        self.opt = torch.optim.AdamW(emb.parameters(), lr=lr, weight_decay=1e-2)
        self.prompt = " ".join(tokens) + f" {class_word}"
        self.rng = np.random.default_rng(0)

    def step(self, k: int) -> float:
        p, dev = self.p, self.device
        idx = self.rng.choice(len(self.images), self.batch)
        imgs = [im[:, ::-1] if self.rng.random() < 0.5 else im for im in self.images[idx]]  # random flip, as the example
        pixels = torch.from_numpy(np.ascontiguousarray(np.stack(imgs))).permute(0, 3, 1, 2).float().to(dev) / 127.5 - 1
        prompts = [TEMPLATES[int(self.rng.integers(len(TEMPLATES)))].format(self.prompt) for _ in idx]
        ids = p["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(dev)
        with torch.no_grad():
            latents = p["vae"].encode(pixels).latent_dist.sample() * p["vae"].config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (len(idx),), device=dev)
        pred = p["unet"](p["noise_scheduler"].add_noise(latents, noise, t), t, encoder_hidden_states=p["text_encoder"](ids)[0]).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        with torch.no_grad():
            w = p["text_encoder"].get_input_embeddings().weight
            w[self.keep] = self.orig[self.keep]
        return float(loss.detach())


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def vm_hwm_mb() -> float:
    """Peak resident set since the last reset, from /proc/self/status."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_memory_mb(name: str, make, device, steps: int = 3) -> float:
    """Peak memory of `steps` steps of one variant (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner = make()
        for k in range(steps):
            runner.step(k)
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del runner
        return peak
    # a fresh process per variant: forking a process whose OpenMP pool is running can deadlock
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", name, *sys.argv[1:]], capture_output=True, text=True, check=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant's CPU peak
    args = ap.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        prepared, images, masks = identity_set(Path(tmp), args.resolution)
        base = training_components("mid", args.resolution, device)
        cfg = TrainConfig(data=prepared, batch_size=args.batch_size, resolution=args.resolution, mixed_precision="no")

        def ours():
            return IdTrainer(cfg, copy.deepcopy(base), images, masks, "toy", device)

        def plain():
            return PlainTextualInversion(copy.deepcopy(base), images, "<v*>", 4, "toy", args.batch_size, 1e-3, device)

        makers = dict(zip(VARIANTS, (ours, plain)))
        if args.memory_of:  # child process: build one variant, run 3 steps, print the peak RSS growth over them
            runner = makers[args.memory_of]()
            Path("/proc/self/clear_refs").write_text("5")  # resets the kernel's peak-RSS mark (VmHWM)
            start = rss_mb()
            for k in range(3):
                runner.step(k)
            print(vm_hwm_mb() - start)
            return
        runners = {name: make() for name, make in makers.items()}
        times = {k: [] for k in runners}
        for k in range(args.steps + 2):  # interleaved, the first two are warm-up
            for name, runner in runners.items():
                sync(device)
                t0 = time.perf_counter()
                runner.step(k)
                sync(device)
                if k >= 2:
                    times[name].append(time.perf_counter() - t0)
        del runners
        memory = {name: peak_memory_mb(name, make, device) for name, make in makers.items()}

    n_params = sum(p.numel() for p in base["unet"].parameters()) / 1e6
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # the least disturbed step: robust on a shared machine
    ratio = med["ours (ID module)"] / med["plain diffusers TI"]
    ratio_min = best["ours (ID module)"] / best["plain diffusers TI"]
    print(f"train step, random mid-size model (UNet {n_params:.1f} M params), batch {args.batch_size}, {args.resolution} px, {device}")
    print(f"{'variant':<22}{'median s/step':>15}{'min s/step':>12}{'peak MB':>10}")
    for k in times:
        print(f"{k:<22}{med[k]:>15.3f}{best[k]:>12.3f}{memory[k]:>10.0f}")
    print(f"ratio ours / plain: {ratio:.3f} on medians, {ratio_min:.3f} on minima (target <= 1.05)")
    row = {
        "unet_params_m": round(n_params, 2),
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "min_s": {k: round(v, 4) for k, v in best.items()},
        "ratio": round(ratio, 3),
        "ratio_min": round(ratio_min, 3),
        "peak_mb": {k: round(v, 1) for k, v in memory.items()},
    }
    record("train_step", [row], device)


if __name__ == "__main__":
    main()
