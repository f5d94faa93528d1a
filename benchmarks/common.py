"""Shared helpers for the benchmarks: a mid-size random model, timing, and the results file."""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from magicme.models import TinyPreset

RESULTS = Path(__file__).with_name("results.json")

# Mid-size: wider and deeper than the tiny preset, still minutes on 2 CPU cores.
MID = TinyPreset(block_out_channels=(64, 128), cross_attention_dim=64, vae_channels=(16, 16, 32, 32), text_layers=4, sample_size=32)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def record(name: str, rows: list[dict], device: torch.device) -> None:
    """Append one run to benchmarks/results.json."""
    runs = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    runs.append(
        {
            "benchmark": name,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device),
            "torch": torch.__version__,
            "rows": rows,
        }
    )
    RESULTS.write_text(json.dumps(runs, indent=2) + "\n")


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    widths = [max(len(c), *(len(f"{r[c]}") for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(f"{r[c]}".ljust(w) for c, w in zip(cols, widths)))


def sd15_size_components(seed: int = 0) -> dict:
    """Random weights in SD-1.5's and the AnimateDiff v1.5 adapter's real shapes (they time like real ones)."""
    from magicme.models import sd15_components

    return sd15_components(seed=seed)


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
