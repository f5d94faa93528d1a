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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from magicme.demo import write_sample_identity  # noqa: E402
from magicme.prepare import PrepareConfig, load_identity_set, prepare_identity_set  # noqa: E402
from magicme.segment import SegmenterConfig  # noqa: E402
from magicme.tokenizer import tiny_clip_tokenizer  # noqa: E402
from magicme.train import IdTrainer, TrainConfig, TEMPLATES  # noqa: E402


VARIANTS = ("ours (ID module)", "plain diffusers TI")


def mid_size_components(resolution: int) -> dict:
    """A random SD-shaped model between the tiny preset and SD-1.5 (about 1/8 of SD-1.5's UNet width)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        sample_size=resolution // 8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=resolution,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    )
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    for m in (unet, vae, text):
        m.requires_grad_(False)
        m.eval()
    return dict(vae=vae, unet=unet, text_encoder=text, tokenizer=tok, noise_scheduler=sched)


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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
        photos = write_sample_identity(Path(tmp) / "photos", count=4, size=args.resolution * 3 // 2)
        prepared = prepare_identity_set(
            PrepareConfig(images=photos, class_word="toy", out=Path(tmp) / "prep", resolution=args.resolution, segmenter=SegmenterConfig(method="grabcut"))
        )
        images, masks, _ = load_identity_set(prepared, args.resolution)
        base = mid_size_components(args.resolution)
        for m in ("vae", "unet", "text_encoder"):
            base[m].to(device)
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
    record = {
        "benchmark": "train_step",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "unet_params_m": round(n_params, 2),
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "steps": args.steps,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "min_s": {k: round(v, 4) for k, v in best.items()},
        "ratio_min": round(ratio_min, 3),
        "peak_mb": {k: round(v, 1) for k, v in memory.items()},
        "ratio": round(ratio, 3),
    }
    path = Path(__file__).with_name("results.json")
    results = json.loads(path.read_text()) if path.exists() else []
    results.append(record)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
