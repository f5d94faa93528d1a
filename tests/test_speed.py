import numpy as np
import pytest
import torch

from magicme.generate import generate_video
from magicme.models import ModelSpec, load_pipeline
from magicme.speed import SpeedOptions, apply_speed_options

KW = dict(seed=3, frames=4, height=64, width=64, steps=2)


def test_low_vram_matches_default_output(tiny_pipe):
    pipe = load_pipeline(ModelSpec(), device="cpu")
    apply_speed_options(pipe, SpeedOptions(low_vram=True), torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    np.testing.assert_allclose(generate_video(pipe, "a dog", **KW), generate_video(tiny_pipe, "a dog", **KW), atol=1e-4)


def test_dtype_choice_and_bad_options():
    assert SpeedOptions().torch_dtype(torch.device("cpu")) == torch.float32
    assert SpeedOptions().torch_dtype(torch.device("cuda")) == torch.float16
    assert SpeedOptions(dtype="bf16").torch_dtype(torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        SpeedOptions(dtype="fp8").check()


@pytest.mark.slow
def test_compiled_unet_matches_eager(tiny_pipe):
    pipe = load_pipeline(ModelSpec(), device="cpu")
    apply_speed_options(pipe, SpeedOptions(compile=True), torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate_video(pipe, "a dog", **KW), generate_video(tiny_pipe, "a dog", **KW), atol=1e-3)


def test_cli_speed_flags_reach_the_pipeline_and_the_record(tmp_path):
    from magicme.cli import main
    from magicme.video import read_sidecar

    out = tmp_path / "v.gif"
    assert main(["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--low-vram", "--attention-slicing",
                 "--out", str(out), "--quiet"]) == 0
    speed = read_sidecar(out)["models"]["speed"]
    assert speed["low_vram"] is True and speed["attention_slicing"] is True and speed["dtype"] == "auto"
    assert main(["generate", "--prompt", "a dog", "--dtype", "fp8", "--out", str(tmp_path / "x.gif")]) == 2
