"""Loading a single-file (Civitai-form) checkpoint through our loader, on a checkpoint the test writes."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from ldm_checkpoint import pipeline_to_ldm
from magicme.generate import generate_video
from magicme.models import ModelSpec, load_pipeline


@pytest.fixture(scope="module")
def single_file(tiny_model_dir, tmp_path_factory):
    sd = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file(pipeline_to_ldm(sd), str(path))
    return path


def test_single_file_checkpoint_loads_same_weights(single_file, tiny_model_dir, tiny_pipe):
    spec = ModelSpec(base=str(single_file), base_config=str(tiny_model_dir), motion_adapter=str(tiny_model_dir / "motion_adapter"))
    pipe = load_pipeline(spec, device="cpu")
    for name in ("vae", "text_encoder"):
        ref = getattr(tiny_pipe, name).state_dict()
        for k, v in getattr(pipe, name).state_dict().items():
            assert torch.allclose(v, ref[k]), (name, k)
    ref = tiny_pipe.unet.state_dict()
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, ref[k]), k
    pipe.set_progress_bar_config(disable=True)
    kw = dict(seed=2, frames=3, height=64, width=64, steps=2)
    assert np.allclose(generate_video(pipe, "a dog", **kw), generate_video(tiny_pipe, "a dog", **kw), atol=1e-5)


def test_unreadable_checkpoint_is_one_clear_error(tmp_path, tiny_model_dir):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_pipeline(ModelSpec(base=str(bad), base_config=str(tiny_model_dir)), device="cpu")
