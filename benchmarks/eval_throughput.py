"""Evaluation speed: frames scored per second batched vs frame by frame, and suite wall time per video
with 1 vs 2 processes.

1. Scoring: a random-weight CLIP ViT-B/32 vision tower and a DINO ViT-S/16 at their real sizes (224 px),
   saved and loaded by path exactly as real weights are; the same frames embedded by our `Scorer`
   with batch_size=32 and with batch_size=1 (what a frame-by-frame loop does).
2. Suite: `magicme evaluate-suite` on the tiny preset and tiny metric models, once as one process
   and once under `accelerate launch` with 2 processes (torchrun; gloo on CPU), fresh results each.

Prints a table and appends a JSON record to benchmarks/results.json.
    python benchmarks/eval_throughput.py [--frames 32] [--videos 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, metric_models, record
from magicme.evaluate import MetricModels, Scorer, save_tiny_metric_models
from magicme.identity import IdentityInfo, save_identity
from magicme.suite import read_rows


def time_scoring(models: MetricModels, frames: list[np.ndarray], batch_size: int, repeats: int = 2) -> float:
    scorer = Scorer(MetricModels(models.clip, models.dino, batch_size), device="cpu")
    scorer.clip_images(frames[:2]), scorer.dino_images(frames[:2])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        scorer.clip_images(frames)
        scorer.dino_images(frames)
        best = min(best, time.perf_counter() - t)
    return len(frames) / best


def suite_project(folder: Path, videos: int) -> Path:
    from PIL import Image

    m = save_tiny_metric_models(folder / "metric")
    (folder / "refs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "refs" / f"{i}.png")
    save_identity(folder / "dog.safetensors", torch.randn(2, 32),
                  IdentityInfo(token="<v*>", class_word="dog", num_vectors=2, hidden_size=32))
    seeds = [0, 1]
    prompts = [f"a <v*> dog, scene {i}" for i in range(videos // len(seeds))]
    doc = {"seeds": seeds, "frames": 16, "steps": 8, "video_format": "gif", "clip_model": m.clip, "dino_model": m.dino,
           "subjects": [{"name": "dog", "identity": "dog.safetensors", "references": "refs", "prompts": prompts}]}
    (folder / "subjects.yaml").write_text(json.dumps(doc))
    return folder / "subjects.yaml"


def time_suite(subjects: Path, results: Path, processes: int) -> float:
    # one thread per process in both runs, so the comparison is of processes, not of thread oversubscription
    # (accelerate gives each of n CPU processes cores/n threads; a lone process would take every core)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    cli = ["-m", "magicme.cli", "evaluate-suite", "--subjects", str(subjects), "--results", str(results), "--quiet"]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        accelerate = Path(sys.executable).with_name("accelerate")
        cmd = [str(accelerate) if accelerate.exists() else shutil.which("accelerate"), "launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(port), *cli]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--videos", type=int, default=12)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    frames = list(rng.integers(0, 256, (args.frames, 256, 256, 3), dtype=np.uint8))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mid = metric_models(tmp / "mid")
        one_by_one = time_scoring(mid, frames, batch_size=1)
        batched = time_scoring(mid, frames, batch_size=32)
        subjects = suite_project(tmp / "suite", args.videos)
        walls = {n: time_suite(subjects, tmp / f"r{n}.jsonl", n) for n in (1, 2)}
        counts = {n: len(read_rows(tmp / f"r{n}.jsonl")) for n in (1, 2)}
    assert counts[1] == counts[2] == args.videos, counts

    print(f"{'what':<44}{'value':>12}")
    print(f"{'frames/s, frame by frame (batch 1)':<44}{one_by_one:>12.1f}")
    print(f"{'frames/s, batched (batch 32)':<44}{batched:>12.1f}")
    print(f"{'batched / frame by frame':<44}{batched / one_by_one:>11.2f}x")
    for n in (1, 2):
        print(f"{f'suite s/video, {n} process(es), tiny preset':<44}{walls[n] / args.videos:>12.2f}")
    print(f"{'suite speed-up, 2 vs 1 processes':<44}{walls[1] / walls[2]:>11.2f}x")

    row = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
        "scoring": {"models": "random CLIP ViT-B/32 + DINO ViT-S/16, 224 px", "frames": args.frames,
                    "frames_per_s_batch1": round(one_by_one, 2), "frames_per_s_batch32": round(batched, 2),
                    "ratio": round(batched / one_by_one, 3)},
        "suite": {"preset": "tiny", "videos": args.videos, "frames": 16, "steps": 8,
                  "s_per_video_1proc": round(walls[1] / args.videos, 3), "s_per_video_2proc": round(walls[2] / args.videos, 3),
                  "threads_per_process": 1,
                  "note": "wall time includes each process's start-up and model loading"},
    }
    record("eval_throughput", [row], torch.device("cpu"))


if __name__ == "__main__":
    main()
