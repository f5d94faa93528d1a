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
    with pytest.raises(ValueError, match="--decode-chunk"):
        SpeedOptions(decode_chunk=0).check()


@pytest.mark.slow
def test_compiled_unet_matches_eager(tiny_pipe):
    pipe = load_pipeline(ModelSpec(), device="cpu")
    apply_speed_options(pipe, SpeedOptions(compile=True), torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(generate_video(pipe, "a dog", **KW), generate_video(tiny_pipe, "a dog", **KW), atol=1e-3)
