"""benchmarks/wan.py (ours vs stock WanPipeline, time and peak memory) on the tiny preset; --low-vram on Wan."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import WanPipeline

from magicme.models import ModelSpec
from magicme.speed import SpeedOptions
from magicme.wan import load_wan_pipeline

BENCH = Path(__file__).parents[1] / "benchmarks"


def bench_module():
    sys.path.insert(0, str(BENCH))  # the benchmarks import their `common` module
    try:
        spec = importlib.util.spec_from_file_location("bench_wan", BENCH / "wan.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_wan"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_wan_benchmark_rows_on_the_tiny_preset():
    bench = bench_module()
    rows = bench.wan_rows("tiny", torch.device("cpu"), bench.WanSetting(frames=5, height=32, width=32, steps=2))
    assert [r["run"] for r in rows] == ["stock WanPipeline", "magicme wan_video (γ 0.15)"]  # --low-vram only on CUDA
    assert all(r["s_per_video"] > 0 and r["peak_gib"] > 0 and r["frames"] == 5 for r in rows)
    assert bench.FULL == bench.WanSetting(81, 480, 832, 50, 5.0)  # the stock Wan 2.1 setting


def test_full_size_components_have_wan_1_3b_shapes():
    parts = bench_module().wan_1_3b_components(torch.device("meta"), torch.bfloat16)  # no memory: shapes only
    count = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("transformer", "text_encoder", "vae")}
    assert count == {"transformer": 1_418_996_800, "text_encoder": 5_680_910_336, "vae": 126_892_531}


def test_low_vram_tiles_and_slices_the_vae_and_offloads_in_blocks_on_cuda(monkeypatch):
    import magicme.wan

    spec = ModelSpec(base="tiny", backbone="wan", speed=SpeedOptions(low_vram=True))
    pipe = load_wan_pipeline(spec, device="cpu")
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    assert not load_wan_pipeline(ModelSpec(base="tiny", backbone="wan"), device="cpu").vae.use_tiling
    offloaded = []
    monkeypatch.setattr(magicme.wan, "offload_in_blocks", lambda pipe, device: offloaded.append(device))
    monkeypatch.setattr(WanPipeline, "to", lambda self, *a, **k: (_ for _ in ()).throw(AssertionError("moved whole")))
    load_wan_pipeline(spec, device="cuda", dtype=torch.float32)
    assert offloaded == [torch.device("cuda")]


def test_block_offloading_keeps_the_frames_of_t2v_and_v2v():
    """The hooks `--low-vram` puts on UMT5 and the transformer (here onloading to the CPU itself) change no value."""
    from diffusers.hooks.group_offloading import _get_group_onload_device

    from magicme.wan import offload_in_blocks, tiny_wan_components
    from magicme.wan_generate import wan_video
    from magicme.wan_v2v import wan_partial_denoise, wan_video_pipeline

    pipe = WanPipeline(**tiny_wan_components())
    pipe.set_progress_bar_config(disable=True)

    def both():
        t2v = wan_video(pipe, "a dog", seed=1, frames=5, height=32, width=32, steps=2)
        return t2v, wan_partial_denoise(wan_video_pipeline(pipe), t2v[None], "a dog", strength=0.5, seeds=[0], steps=4)

    plain = both()
    offload_in_blocks(pipe, torch.device("cpu"))
    assert _get_group_onload_device(pipe.text_encoder) == _get_group_onload_device(pipe.transformer) == torch.device("cpu")
    for a, b in zip(plain, both()):
        assert np.array_equal(a, b)
