import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline

from magicme.generate import GenerateConfig, generate, generate_video
from magicme.models import ModelSpec, tiny_components
from magicme.video import read_sidecar, read_video


def test_gamma_zero_equals_stock_animatediff_bit_for_bit(tiny_pipe):
    kwargs = dict(num_frames=8, height=64, width=64, num_inference_steps=4, guidance_scale=7.5)
    parts = tiny_components()
    parts["scheduler"] = tiny_pipe.scheduler  # same schedule object config
    stock = AnimateDiffPipeline(**parts)
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        prompt="a dog", generator=torch.Generator().manual_seed(5), output_type="np", **kwargs
    ).frames[0]
    ours = generate_video(tiny_pipe, "a dog", seed=5, frames=8, height=64, width=64, steps=4, gamma=0.0)
    assert np.array_equal(ours, expected)


def test_gamma_changes_the_video(tiny_pipe):
    a = generate_video(tiny_pipe, "a dog", seed=5, frames=4, height=64, width=64, steps=2, gamma=0.0)
    b = generate_video(tiny_pipe, "a dog", seed=5, frames=4, height=64, width=64, steps=2, gamma=0.5)
    assert not np.allclose(a, b)


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ""])
def test_outputs_decode_and_sidecar_round_trips(tiny_pipe, tmp_path, suffix):
    cfg = GenerateConfig(prompts=["a dog"], seeds=[3], frames=5, steps=2, gamma=0.2, models=ModelSpec(base="tiny"))
    out = tmp_path / f"clip{suffix}"
    [path] = generate(cfg, out, pipe=tiny_pipe, quiet=True)
    frames = read_video(path)
    assert frames.shape == (5, 64, 64, 3) and frames.dtype == np.uint8
    rec = read_sidecar(path)
    assert rec["prompt"] == "a dog" and rec["seed"] == 3 and rec["gamma"] == 0.2 and rec["steps"] == 2
    assert rec["models"]["base"]["name"] == "tiny" and rec["models"]["scheduler"] == "ddim"
    assert rec["height"] == 64 and rec["frames"] == 5 and "torch" in rec["versions"]
    # the record reproduces the video
    again = GenerateConfig(
        prompts=[rec["prompt"]], seeds=[rec["seed"]], frames=rec["frames"], steps=rec["steps"],
        gamma=rec["gamma"], guidance=rec["guidance"], height=rec["height"], width=rec["width"],
    )
    [path2] = generate(again, tmp_path / f"again{suffix}", pipe=tiny_pipe, quiet=True)
    if suffix != ".mp4":  # lossless formats compare exactly
        assert np.array_equal(read_video(path2), frames)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_several_prompts_and_seeds_one_model(tiny_pipe, tmp_path):
    cfg = GenerateConfig(prompts=["a dog", "a cat"], seeds=[1, 2], frames=2, steps=1)
    paths = generate(cfg, tmp_path / "v.gif", pipe=tiny_pipe, quiet=True)
    assert [p.name for p in paths] == ["v_p0_s1.gif", "v_p0_s2.gif", "v_p1_s1.gif", "v_p1_s2.gif"]
    assert all(p.exists() for p in paths)
    assert read_sidecar(paths[3])["prompt"] == "a cat"


def test_default_size_is_the_models_sample_size_times_the_vae_scale(tmp_path):
    """A base whose UNet was trained at 12 latents (96 px at the VAE's 8×): the default size is 96, read from
    its configs before loading and from the loaded pipeline after, not SD-1.5's 512."""
    from magicme.models import TinyPreset, load_pipeline, save_tiny_model

    folder = save_tiny_model(tmp_path / "model", TinyPreset(sample_size=12))
    cfg = GenerateConfig(prompts=["a dog"], frames=2, steps=1, models=ModelSpec(base=str(folder)))
    assert cfg.size() == (96, 96)
    assert GenerateConfig(prompts=["a dog"], width=128, models=ModelSpec(base=str(folder))).size() == (96, 128)
    pipe = load_pipeline(cfg.models, device="cpu")
    assert cfg.size(pipe) == (96, 96)
    [path] = generate(cfg, tmp_path / "v.gif", pipe=pipe, quiet=True)
    assert read_video(path).shape == (2, 96, 96, 3) and read_sidecar(path)["height"] == 96
