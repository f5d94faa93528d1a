"""The GPU benchmark command on the CPU (so it never rots), its time budget, FLOP counting and the peak table."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from common import dense_peak_tflops, markdown_table, unet_flops  # noqa: E402


def run_gpu_py(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "gpu.py"), *args], capture_output=True, text=True, timeout=timeout)


def committed_results() -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in BENCH.glob("RESULTS*.md")} | {
        "results.json": hashlib.sha256((BENCH / "results.json").read_bytes()).hexdigest()}


def test_gpu_command_runs_on_the_cpu_into_a_folder(tmp_path):
    before = committed_results()
    done = run_gpu_py("--sizes", "tiny", "--sections", "t2v", "train", "chain", "fp8", "cudagraphs", "wan", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert committed_results() == before  # the committed figures are never touched by a test

    md = (tmp_path / "RESULTS-cpu.md").read_text()
    assert f"torch {torch.__version__}" in md and "diffusers 0.4" in md and "commit" in md
    for title in ("T2V: stock diffusers against magicme's defaults", "ID training", "Face VCD, Tiled VCD and the finished video"):
        assert f"## {title}" in md
    assert "*skipped: CUDA only*" in md and "*skipped: FP8 needs a CUDA GPU" in md

    runs = {r["benchmark"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    t2v = runs["gpu/t2v"]
    assert t2v["status"] == "ok" and t2v["environment"]["torch"] == torch.__version__
    labels = [r["variant"] for r in t2v["rows"]]
    assert [label[:3] for label in labels] == ["(b)", "(c)", "(a)"]
    for row in t2v["rows"]:
        assert row["s_per_video"] > 0 and row["unet_TFLOP_s"] > 0 and row["peak_GiB"] > 0
    assert t2v["rows"][0]["x_b"] == 1.0
    assert any("TFLOP per call" in n for n in t2v["notes"])
    train = runs["gpu/train"]["rows"]
    assert len(train) == 3 and all(r["seconds"] > 0 for r in train)
    stages = [r["stage"] for r in runs["gpu/chain"]["rows"]]
    assert stages[1].startswith("T2V VCD") and stages[2].startswith("Face VCD") and stages[3].startswith("Tiled VCD")
    assert stages[-1].startswith("finished 128² video")
    assert runs["gpu/fp8"]["status"].startswith("skipped") and runs["gpu/cudagraphs"]["status"] == "skipped: CUDA only"
    wan = runs["gpu/wan"]["rows"]  # benchmarks/wan.py's section: stock WanPipeline, then ours
    assert [r["run"].split()[0] for r in wan] == ["stock", "magicme"] and all(r["s_per_video"] > 0 for r in wan)


def test_time_budget_stops_a_section_and_skips_the_rest(tmp_path):
    done = run_gpu_py("--sizes", "tiny", "--sections", "compile", "t2v", "--budget", "11", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads((tmp_path / "results.json").read_text())
    assert [r["benchmark"] for r in runs] == ["gpu/compile", "gpu/t2v"]
    assert runs[0]["status"].startswith("stopped by the time budget after")
    assert runs[1]["status"] == "skipped: the time budget is spent"
    assert "*stopped by the time budget" in (tmp_path / "RESULTS-cpu.md").read_text()


def test_unet_flops_on_the_meta_device_match_a_real_run():
    """The meta-device count equals FlopCounterMode over a real CPU call with the explicit attention processor
    (whose matmuls the counter sees; the CPU SDPA kernel has no FLOP formula)."""
    from diffusers import UNetMotionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from magicme.models import tiny_components

    parts = tiny_components()
    unet = UNetMotionModel.from_unet2d(parts["unet"], parts["motion_adapter"]).eval()
    unet.set_attn_processor(AttnProcessor())
    x, text = torch.randn(2, 4, 3, 8, 8), torch.randn(6, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500), encoder_hidden_states=text)
    assert unet_flops(dict(unet.config), frames=3, height=64, width=64) == counter.get_total_flops() > 0


def test_dense_peaks_by_device_name():
    assert dense_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert dense_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert dense_peak_tflops("NVIDIA H200") == 989.4
    assert dense_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dense_peak_tflops("NVIDIA L4") == 121.0 and dense_peak_tflops("NVIDIA L40S") == 362.1
    assert dense_peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert dense_peak_tflops("NVIDIA Quadro P1000") is None


def test_markdown_table_takes_the_union_of_columns():
    md = markdown_table([{"a": 1, "b": None}, {"a": 2, "c": "x|y"}])
    assert md.splitlines() == ["| a | b | c |", "| --- | --- | --- |", "| 1 |  |  |", "| 2 |  | x\\|y |"]


def test_a_section_in_another_file_is_imported_by_name():
    import common
    import gpu

    assert gpu.Section("elsewhere", "common:markdown_table").function() is common.markdown_table
    assert gpu.SECTIONS["t2v"].function() is gpu.t2v
    assert list(gpu.SECTIONS)[:4] == ["t2v", "low_vram", "train", "chain"]  # the figures that matter most come first


def test_a_variant_post_step_runs_on_the_built_pipeline():
    """How the fp8 section puts torchao's float8 layers into magicme's pipeline (after its own options)."""
    import t2v_speed

    seen = []
    pipe = t2v_speed.build(t2v_speed.Variant("post", post=seen.append), "tiny", torch.device("cpu"))
    assert seen == [pipe] and pipe.unet.dtype == torch.float32


@pytest.mark.parametrize("script", ["t2v_speed", "chain", "train_step", "v2v", "long_video", "eval_throughput", "gpu",
                                    "real_size", "t2v_overhead", "ui_requests"])
def test_benchmark_scripts_import_and_parse(script, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0 and "usage" in capsys.readouterr().out
