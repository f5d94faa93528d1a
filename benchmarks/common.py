"""Shared by the benchmarks: random models at three scales, timing, memory, FLOPs and the results files.

Scales: `full` has the real shapes of SD-1.5 (UNet, VAE, CLIP ViT-L text encoder) and of the AnimateDiff
v1.5 motion adapter, with random weights (they time like the real ones); `mid` is wider and deeper than
the tiny preset and still runs in seconds on a CPU; `tiny` is the tiny preset itself.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's magicme, installed or not
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never reach a hub

import torch  # noqa: E402

from magicme.models import TinyPreset  # noqa: E402

RESULTS = Path(__file__).with_name("results.json")
SCALES = ("full", "mid", "tiny")

# Mid-size: wider and deeper than the tiny preset, still minutes on 2 CPU cores.
MID = TinyPreset(block_out_channels=(64, 128), cross_attention_dim=64, vae_channels=(16, 16, 32, 32), text_layers=4, sample_size=32)

# Dense (no sparsity) fp16/bf16 tensor-core peaks with fp32 accumulation, TFLOP/s, from the vendors' data
# sheets; matched on the CUDA device name, most specific pattern first.
PEAK_TFLOPS = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.5),
    (r"\bH200\b.*\bNVL\b", 835.5),
    (r"\bGH200\b", 989.4),
    (r"\bH100\b", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH200\b", 989.4),
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.1),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b", 165.2),
    (r"\bRTX 3090\b", 71.0),
    (r"\bRTX A6000\b", 154.8),
    (r"\bV100\b", 125.0),  # fp16 only
    (r"\bT4\b", 65.0),  # fp16 only
)


def dense_peak_tflops(name: str) -> float | None:
    """The GPU's dense fp16/bf16 peak from `PEAK_TFLOPS`, or None for a device not in the table."""
    import re

    return next((peak for pattern, peak in PEAK_TFLOPS if re.search(pattern, name)), None)


# ---- models


def sd15_size_components(seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """SD-1.5's and the AnimateDiff v1.5 adapter's real shapes with random weights (`models.sd15_components`),
    built on `device` (seconds on a GPU instead of a minute on its host)."""
    from magicme.models import make_scheduler, sd15_components

    with torch.device(device):
        parts = sd15_components(seed=seed)
    return dict(parts, scheduler=make_scheduler("ddim"))  # the scheduler's tables stay on the CPU, as diffusers keeps them


def components(scale: str, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """AnimateDiff components (UNet still 2D, plus its motion adapter) of a scale, on `device`."""
    from magicme.models import tiny_components

    if scale == "full":
        return sd15_size_components(seed, device)
    parts = tiny_components(MID if scale == "mid" else TinyPreset(seed=seed))
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(device)
    return parts


def t2v_pipeline(scale: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A stock `AnimateDiffPipeline` with random weights of `scale`, on `device` in `dtype`, progress bar off."""
    from diffusers import AnimateDiffPipeline

    parts = components(scale, device, seed)
    with torch.device(device):  # the motion UNet is assembled where its parts are (not on the CPU and moved)
        pipe = AnimateDiffPipeline(**parts)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_model(folder: Path, scale: str, device: str | torch.device = "cpu") -> tuple[Path, Path, int]:
    """Save a random model as a diffusers folder (+ motion_adapter/, controlnet/); return paths and text width.

    Built on `device` (random initialisation of SD-1.5's size takes a minute on a CPU), saved in fp16 at full size.
    """
    from diffusers import ControlNetModel, StableDiffusionPipeline

    parts = components(scale, device)
    with torch.device(device):
        controlnet = ControlNetModel.from_unet(parts["unet"])
    dtype = torch.float16 if scale == "full" else torch.float32
    for part in [*parts.values(), controlnet]:
        if isinstance(part, torch.nn.Module):
            part.to(device="cpu", dtype=dtype)
    adapter = parts.pop("motion_adapter")
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    adapter.save_pretrained(folder / "motion_adapter")
    controlnet.save_pretrained(folder / "controlnet")
    return folder, folder / "controlnet", parts["text_encoder"].config.hidden_size


def training_components(scale: str, resolution: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """vae, unet, text_encoder, tokenizer and a DDPM noise scheduler for ID training, frozen, as `magicme train` holds them.

    `mid` here is an SD-shaped model between the tiny preset and SD-1.5 (about 1/8 of SD-1.5's UNet width);
    the image models are in `dtype`, the text encoder in fp32 (the gradients flow through it).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from magicme.tokenizer import tiny_clip_tokenizer

    if scale == "full":
        parts = sd15_size_components(device=device)
        parts.pop("motion_adapter")
        parts.pop("scheduler")
    else:
        tok = tiny_clip_tokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(
                block_out_channels=(64, 128, 256), layers_per_block=2, sample_size=resolution // 8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
            )
            vae = AutoencoderKL(
                block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32, layers_per_block=1,
                sample_size=resolution,
            )
            text = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            ))
        parts = dict(vae=vae, unet=unet, text_encoder=text, tokenizer=tok)
    parts["noise_scheduler"] = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    for name in ("vae", "unet", "text_encoder"):
        parts[name].requires_grad_(False).eval().to(device=device, dtype=dtype if name != "text_encoder" else torch.float32)
    return parts


def metric_models(folder: Path):
    """CLIP ViT-B/32 (vision 768 wide, 12 layers; text 512) and DINO ViT-S/16 (384 wide, 12 layers), random weights, saved."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, ViTConfig, ViTImageProcessorPil, ViTModel

    from magicme.evaluate import MetricModels
    from magicme.tokenizer import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32),
        projection_dim=512,
    ))
    dino = ViTModel(ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                              image_size=224, patch_size=16), add_pooling_layer=False)
    clip.save_pretrained(folder / "clip")
    tok.save_pretrained(folder / "clip")
    CLIPImageProcessorPil().save_pretrained(folder / "clip")
    dino.save_pretrained(folder / "dino")
    ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(folder / "dino")
    return MetricModels(clip=str(folder / "clip"), dino=str(folder / "dino"))


# ---- FLOPs


def unet_flops(unet_config: dict, frames: int, height: int, width: int, batch: int = 2, text_tokens: int = 77) -> int:
    """FLOPs of one call of a motion UNet with this config, counted by `FlopCounterMode` on the meta device.

    batch 2 = classifier-free guidance; the pipeline repeats the prompt embedding per frame. The meta device
    allocates nothing, and counts SDPA (on the CPU the flash kernel has no FLOP formula and counts as 0).
    """
    from diffusers import UNetMotionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNetMotionModel.from_config(unet_config)
        x = torch.empty(batch, unet.config.in_channels, frames, height // 8, width // 8)
        text = torch.empty(batch * frames, text_tokens, unet.config.cross_attention_dim)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor(500), encoder_hidden_states=text)
    return counter.get_total_flops()


# ---- timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


class PeakMemory:
    """Peak GPU memory (CUDA) or peak process RSS sampled every 5 ms (CPU) over a `with` block, in GiB."""

    def __init__(self, device: torch.device):
        self.device, self.peak_gib = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import threading

            import psutil

            proc, self._stop = psutil.Process(), threading.Event()
            self._peak = proc.memory_info().rss

            def sample():
                while not self._stop.wait(0.005):
                    self._peak = max(self._peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self._stop.set()
            self._thread.join()
            self.peak_gib = self._peak / 2**30


def held_gib(device: torch.device) -> float:
    """Memory held right now (after giving freed memory back), the baseline a call's peak is measured from."""
    import ctypes
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(device) / 2**30
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed pages otherwise, hiding the next call's rise
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**30


# ---- the machine and the results files


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} ({n} thread{'s' if n > 1 else ''} of {os.cpu_count()} cores)"


def _command(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _driver_from_proc() -> str | None:
    """The NVIDIA kernel module's version ("... Kernel Module  550.54.15 ..."), where nvidia-smi is missing."""
    import re

    try:
        match = re.search(r"Kernel Module\s+(\S+)", Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        return None
    return match.group(1) if match else None


def environment(device: torch.device) -> dict:
    """Where and with what a benchmark ran: device, driver, CUDA, torch, diffusers, date, commit."""
    import diffusers

    env = {
        "device": device_name(device),
        "driver": None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": _command("git", "rev-parse", "--short", "HEAD"),
    }
    if env["commit"] and _command("git", "status", "--porcelain", "--", ".", ":!benchmarks/results.json", ":!benchmarks/RESULTS*"):
        env["commit"] += " (with uncommitted changes)"
    if device.type == "cpu":
        env["load_average"] = round(os.getloadavg()[0], 1)  # a shared machine stretches every time
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        env["driver"] = _command("nvidia-smi", f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader") or _driver_from_proc()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def record(name: str, rows: list[dict], device: torch.device, path: Path = RESULTS, **extra) -> None:
    """Append one run to results.json (`path`), atomically."""
    runs = json.loads(path.read_text()) if path.exists() else []
    runs.append({
        "benchmark": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        **extra,
        "rows": rows,
    })
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(runs, indent=2) + "\n")
    tmp.replace(path)


def table(rows: list[dict]) -> list[list[str]]:
    """Rows of dicts as a header and cells (the union of their keys, in first-seen order)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [cols] + [["" if r.get(c) is None else f"{r[c]}" for c in cols] for r in rows]


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cells = table(rows)
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for k, row in enumerate(cells):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
        if k == 0:
            print("-+-".join("-" * w for w in widths))


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cells = table(rows)
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + " --- |" * len(cells[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells[1:]]
    return "\n".join(lines) + "\n"
