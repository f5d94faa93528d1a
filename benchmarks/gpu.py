"""Every GPU figure of issue 16 in one command, within a time budget, into RESULTS.md and results.json.

    python benchmarks/gpu.py [--budget 480] [--sections t2v low_vram ...] [--out benchmarks]

On CUDA (full size: SD-1.5 + AnimateDiff v1.5 shapes, random weights; 16 frames 512², 25 DDIM steps), in
order of importance: `t2v` (a) stock fp32, (b) stock at its best documented settings, (c) magicme's
defaults, with the UNet's achieved TFLOP/s against the GPU's dense peak and host syncs per step;
`low_vram` (e); `train` ID training at batch 4, 512², the paper's 200 steps; `chain` Face VCD and Tiled
VCD per frame and a finished 1024² video; `compile` (d) beside (b) (its compilation time is the one
unknown, so it comes after the sure figures; inductor's cache makes a second run fast); `options` each
default switched off; `fp8` (capability >= 8.9) with its difference from bf16; `cudagraphs`.
On a CPU the same sections run the mid-size model on small clips in CI-sized time; `compile` and
`cudagraphs` (minutes of C++ compilation, or CUDA only) and `fp8` run only where they can.

Each section runs in its own process, within what is left of the budget (a fresh allocator for its
peak memory; a crash or a hang costs that section only). Its rows are saved as they are taken,
RESULTS.md (RESULTS-cpu.md on a CPU) is rewritten after each section and one record per section is
appended to results.json. A new section (another backbone, another benchmark) is one function, here or
in its own file of benchmarks/, and one line in SECTIONS.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from common import dense_peak_tflops, environment, markdown_table, record
from t2v_speed import Clip, Variant, add_ratio, add_throughput, host_syncs, measure, motion_unet_config, variants

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    scale: str  # common.components: full | mid | tiny
    clip: Clip  # text-to-video
    train_resolution: int
    train_steps: int  # timed ID-training steps (200: the paper's whole run)
    chain: Clip  # T2V → Face VCD → Tiled VCD ×2
    repeats: int  # timed videos per variant


SIZES = {
    "full": Sizes("full", Clip(16, 512, 25), train_resolution=512, train_steps=200, chain=Clip(16, 512, 25), repeats=2),
    "cpu": Sizes("mid", Clip(8, 64, 2), train_resolution=64, train_steps=4, chain=Clip(4, 64, 5), repeats=1),
    "tiny": Sizes("tiny", Clip(4, 64, 2), train_resolution=64, train_steps=3, chain=Clip(2, 64, 5), repeats=1),  # tests
}


@dataclass
class Context:
    """What a section gets: sizes and device, and `save()` to write its rows and notes as they are taken."""

    sizes: Sizes
    device: torch.device
    path: Path
    rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"rows": self.rows, "notes": self.notes}))
        tmp.replace(self.path)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()


# ---- sections: one function each, in SECTIONS below


def t2v(ctx: Context) -> None:
    clip, dev = ctx.sizes.clip, ctx.device
    table = variants(dev)
    flops = unet_flops_per_call(ctx)
    for key in ("b", "c", "a"):
        repeats = 1 if key == "a" else ctx.sizes.repeats  # fp32 is the slow one
        ctx.add(measure(table[key], ctx.sizes.scale, clip, dev, repeats))
        add_throughput(ctx.rows, flops, dev)
        add_ratio(ctx.rows, table["b"].label)
        ctx.save()
    if dev.type == "cuda":
        from t2v_speed import build

        per_step, by_file = host_syncs(build(table["c"], ctx.sizes.scale, dev), table["c"], clip)
        ctx.notes.append(f"Host syncs per denoising step in (c): {per_step:g} ({', '.join(f'{k}: {v}' for k, v in by_file.items()) or 'none'}).")
    ctx.notes.append("x_b: time over (b)'s. Targets: (c) ≤ 0.75× (b); (d) ≤ 0.6× (b); UNet ≥ 40 % of the dense peak with --compile; (e) ≤ 8 GiB.")
    ctx.save()


def low_vram(ctx: Context) -> None:
    ctx.add(measure(variants(ctx.device)["e"], ctx.sizes.scale, ctx.sizes.clip, ctx.device, ctx.sizes.repeats))
    ctx.notes.append("Target: 16 frames 512² within 8 GiB of GPU memory (peak allocated; weights wait on the CPU).")
    ctx.save()


def compile_(ctx: Context, mode: str = "max-autotune-no-cudagraphs") -> None:
    table = variants(ctx.device)
    flops = unet_flops_per_call(ctx)
    d = replace(table["d"], label=f"(d) magicme --compile ({mode})", options=replace(table["d"].options, compile_mode=mode))
    for v in (table["b"], d):
        ctx.add(measure(v, ctx.sizes.scale, ctx.sizes.clip, ctx.device, ctx.sizes.repeats))
        add_throughput(ctx.rows, flops, ctx.device)
        add_ratio(ctx.rows, table["b"].label)
        ctx.save()
    ctx.notes.append("first_call_s: the warm-up video, compilation included (cached by inductor for later runs).")
    ctx.save()


def cudagraphs(ctx: Context) -> None:
    compile_(ctx, mode="max-autotune")


def train(ctx: Context) -> None:
    from train_step import id_training_seconds

    s, dev = ctx.sizes, ctx.device
    with tempfile.TemporaryDirectory() as tmp:
        times = id_training_seconds(s.scale, s.train_resolution, 4, s.train_steps, dev, Path(tmp))
    steady = times[2:] or times
    ctx.add({"what": f"ID training step, batch 4, {s.train_resolution}²", "seconds": round(statistics.median(steady), 4)})
    ctx.add({"what": f"{s.train_steps} steps (measured, first steps included)", "seconds": round(sum(times), 2)})
    if s.train_steps != 200:
        ctx.add({"what": "200 steps (the paper's), projected from the median step", "seconds": round(200 * statistics.median(steady), 2)})
    ctx.notes.append("Optimizer steps only (IdTrainer.step, mixed precision auto); checkpoints and validation renders excluded.")
    ctx.save()


def chain(ctx: Context) -> None:
    from chain import measure_chain

    c = ctx.sizes.chain
    _, peak = measure_chain(ctx.sizes.scale, c.frames, c.size, c.steps, ctx.device, on_row=ctx.add)
    ctx.notes.append(f"One pipeline for all three stages (as `magicme run`), magicme's defaults; peak memory {peak:.2f} GiB.")
    ctx.save()


def options(ctx: Context) -> None:
    """Each default option switched off, one at a time, against the defaults (c)."""
    from magicme.speed import SpeedOptions

    dev = ctx.device
    base = variants(dev)["c"]
    ablations = {"--no-fuse-qkv": SpeedOptions(fuse_qkv=False), "--decode-chunk 16 (diffusers' chunk)": SpeedOptions(decode_chunk=16),
                 "--attention-slicing": SpeedOptions(attention_slicing=True)}
    if dev.type == "cuda":
        ablations["channels-last off"] = SpeedOptions(channels_last=False)
        if SpeedOptions().torch_dtype(dev) == torch.bfloat16:
            ablations["--dtype fp16"] = SpeedOptions(dtype="fp16")
    for v in [base] + [Variant(f"(c) with {name}", options=opts) for name, opts in ablations.items()]:
        ctx.add(measure(v, ctx.sizes.scale, ctx.sizes.clip, dev, ctx.sizes.repeats, unet=False))
        add_ratio(ctx.rows, base.label, "x_default")
        ctx.save()


def fp8(ctx: Context) -> None:
    from magicme.speed import SpeedOptions

    dev = ctx.device
    base = variants(dev)["c"]
    flops = unet_flops_per_call(ctx)
    videos: dict = {}
    runs = [base, Variant("magicme --fp8", options=SpeedOptions(fp8=True)),
            Variant("magicme --fp8 --compile", options=SpeedOptions(fp8=True, compile=True))]
    if importlib.util.find_spec("torchao") is not None:  # the same per-row recipe on torchao's kernels
        runs += [Variant("torchao float8 per-row", post=torchao_float8),
                 Variant("torchao float8 per-row --compile", options=SpeedOptions(compile=True), post=torchao_float8)]
    else:
        ctx.notes.append("torchao is not installed: no rows of its float8 kernels beside ours.")
    for v in runs:
        row = measure(v, ctx.sizes.scale, ctx.sizes.clip, dev, ctx.sizes.repeats, frames_out=videos)
        if v is not base:
            diff = np.asarray(videos[v.label], dtype=np.float64) - videos[base.label]
            row["max_abs_diff"] = round(float(np.abs(diff).max()), 4)
            row["psnr_vs_bf16_dB"] = round(float(10 * np.log10(1 / max(np.mean(diff**2), 1e-12))), 2)
        ctx.add(row)
        add_throughput(ctx.rows, flops, dev)
        add_ratio(ctx.rows, base.label, "x_default")
        ctx.save()
    ctx.notes.append("Output difference: the same seed's video against the bf16 default, pixels in [0, 1]. "
                     "pct_of_peak is of the bf16 peak (float8's is twice that).")
    ctx.save()


def torchao_float8(pipe) -> None:
    """torchao's `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())` on the UNet's linear layers that
    `--fp8` converts (both sides multiples of 16), after magicme's other options (`unet.compile` traces on the
    first call, so a compiled variant compiles the quantised layers)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    def eligible(module, name) -> bool:
        return type(module) is torch.nn.Linear and module.in_features % 16 == 0 and module.out_features % 16 == 0

    quantize_(pipe.unet, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=eligible)


def unet_flops_per_call(ctx: Context) -> int:
    from common import unet_flops

    c = ctx.sizes.clip
    flops = unet_flops(motion_unet_config(ctx.sizes.scale), c.frames, c.size, c.size)
    peak = dense_peak_tflops(torch.cuda.get_device_name(ctx.device)) if ctx.device.type == "cuda" else None
    ctx.notes.append(
        f"UNet + motion modules: {flops / 1e12:.4g} TFLOP per call (CFG batch 2; FlopCounterMode on the meta device), "
        f"{c.steps * flops / 1e12:.4g} TFLOP per video; dense bf16/fp16 peak of this device: "
        + (f"{peak} TFLOP/s." if peak else "not in the table (common.PEAK_TFLOPS): no share of peak.")
    )
    return flops


def cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "CUDA only"


def needs_fp8(device: torch.device) -> str | None:
    from magicme.speed import FP8_CAPABILITY

    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_CAPABILITY:
        return None
    return "FP8 needs a CUDA GPU of compute capability 8.9 or newer"


def anywhere(device: torch.device) -> None:
    return None


@dataclass(frozen=True)
class Section:
    """One benchmark section. `run` takes a Context and adds its rows (`ctx.add`) and notes as it takes them; it is a
    function here or "module:function" of another file in benchmarks/, imported only in the section's own process."""

    title: str
    run: Callable[[Context], None] | str
    why_not: Callable[[torch.device], str | None] = anywhere  # None where it can run on this device, else why not
    on_cpu: bool = True  # run by default on a CPU (else only when named in --sections)

    def function(self) -> Callable[[Context], None]:
        if callable(self.run):
            return self.run
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


# In order of importance: the budget may stop the run before the last ones. Another backbone or another
# benchmark is one entry here, e.g. `"wan": Section("Wan 2.x T2V", "wan:wan_t2v")` for a function
# `wan_t2v(ctx)` in benchmarks/wan.py (ctx.sizes.scale says full on a GPU, mid or tiny on a CPU).
SECTIONS: dict[str, Section] = {
    "t2v": Section("T2V: stock diffusers against magicme's defaults", t2v),
    "low_vram": Section("T2V with --low-vram", low_vram),
    "train": Section("ID training", train),
    "chain": Section("Face VCD, Tiled VCD and the finished video", chain),
    "compile": Section("T2V with --compile", compile_, on_cpu=False),  # its compile time is the unknown: after the sure ones
    "options": Section("Each default speed option switched off", options),
    "fp8": Section("FP8 (--fp8) and its output difference", fp8, needs_fp8),
    "cudagraphs": Section("T2V with --compile --compile-mode max-autotune (CUDA graphs)", cudagraphs, cuda_only),
    "wan": Section("Wan 2.1 T2V 1.3B (81 frames 480×832, 50 steps): stock WanPipeline against magicme", "wan:wan_t2v"),
}


# ---- the driver


def run_section(name: str, args, left: float) -> dict:
    """Run one section in a child process for at most `left` seconds; its rows (partial when stopped) and status."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "rows.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, __file__, "--child", name, "--child-file", str(out), "--device", args.device, "--sizes", args.sizes,
               "--threads", str(args.threads)]
        t0 = time.perf_counter()
        with open(err, "w") as stderr:
            try:
                rc = subprocess.run(cmd, stderr=stderr, timeout=left).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"stopped by the time budget after {left:.0f} s"
        taken = json.loads(out.read_text()) if out.exists() else {"rows": [], "notes": []}
        if status.startswith("failed"):
            lines = [ln for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
            status += f": {lines[-1][:300] if lines else 'no message'}"
    return {"name": name, "title": SECTIONS[name].title, "status": status, "seconds": round(time.perf_counter() - t0, 1), **taken}


def skipped(name: str, status: str) -> dict:
    return {"name": name, "title": SECTIONS[name].title, "status": status, "seconds": 0.0, "rows": [], "notes": []}


def write_markdown(path: Path, env: dict, sizes: Sizes, results: list[dict], started: float, args) -> None:
    lines = [
        "# Benchmark results" + (" (CPU)" if env["cuda"] is None else ""),
        "",
        f"`python benchmarks/gpu.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` on **{env['device']}**"
        f" (driver {env['driver'] or 'n/a'}, CUDA {env['cuda'] or 'n/a'}) · torch {env['torch']} · diffusers {env['diffusers']}"
        f" · {env['date']} · commit {env['commit'] or 'n/a'} · {time.perf_counter() - started:.0f} s of a {args.budget:.0f} s budget"
        + (f" · load average {env['load_average']} when it started." if "load_average" in env else "."),
        "",
        f"Model: {sizes.scale} size, random weights (they time like trained ones). Text-to-video: {sizes.clip.frames} frames "
        f"{sizes.clip.size}², {sizes.clip.steps} DDIM steps, CFG {sizes.clip.guidance}. Seconds are medians of {sizes.repeats} "
        "video(s) after a warm-up; peak memory is the allocator's peak (CUDA) or the process's resident set (CPU).",
        "",
    ]
    for r in results:
        lines += [f"## {r['title']}", ""]
        if r["status"] != "ok":
            lines += [f"*{r['status']}*", ""]
        if r["rows"]:
            lines += [markdown_table(r["rows"])]
        lines += [f"{n}" for n in r["notes"]] + ([""] if r["notes"] else [])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", choices=list(SIZES), default=None, help="default: full on CUDA, cpu (mid-size model) on a CPU")
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=None,
                    help="default: every one this device can run (on a CPU: not compile, cudagraphs, fp8)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 8 minutes)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: no OpenMP spin-waits on a shared machine)")
    ap.add_argument("--out", type=Path, default=HERE, help="folder of RESULTS.md and results.json (default: benchmarks/)")
    ap.add_argument("--child", choices=list(SECTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--child-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not its notices about dtype casts of random models
    device = torch.device(args.device)
    args.sizes = args.sizes or ("full" if device.type == "cuda" else "cpu")
    sizes = SIZES[args.sizes]

    if args.child:  # one section, in this process
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        SECTIONS[args.child].function()(Context(sizes, device, args.child_file))
        return

    started = time.perf_counter()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)  # as the sections run
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = args.out / ("RESULTS.md" if device.type == "cuda" else "RESULTS-cpu.md")
    results = []
    for name in args.sections or list(SECTIONS):
        left = args.budget - (time.perf_counter() - started)
        why = SECTIONS[name].why_not(device)
        if why:
            result = skipped(name, f"skipped: {why}")
        elif not (args.sections or device.type == "cuda" or SECTIONS[name].on_cpu):
            result = skipped(name, "skipped: not run by default on a CPU (minutes of compilation); name it in --sections")
        elif left < 10:
            result = skipped(name, "skipped: the time budget is spent")
        else:
            print(f"== {name} ({left:.0f} s left)", flush=True)
            result = run_section(name, args, left)
        results.append(result)
        print(f"== {name}: {result['status']} in {result['seconds']} s", flush=True)
        write_markdown(markdown, env, sizes, results, started, args)
        record(f"gpu/{name}", result["rows"], device, path=args.out / "results.json", status=result["status"],
               notes=result["notes"], sizes=asdict(sizes), environment=env)
    print(f"wrote {markdown} and {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
