"""Motion modules from single files: AnimateDiff's original checkpoints (v1/v2/v3) and diffusers-layout copies."""

import os

import numpy as np
import pytest
import torch
from diffusers import MotionAdapter
from safetensors.torch import save_file

from animatediff_checkpoint import adapter_to_original, random_adapter
from pickle_payload import CreatesFile
from magicme.generate import generate_video
from magicme.models import ModelSpec, load_motion_adapter, load_pipeline

# the three generations of the original release, told apart as diffusers does: v2 has a mid-block module,
# v1's positional table has 24 frames, v3's 32 and no mid block
VERSIONS = {"v1": dict(max_frames=24, mid_block=False), "v2": dict(max_frames=32, mid_block=True),
            "v3": dict(max_frames=32, mid_block=False)}


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def original(request, tmp_path_factory):
    """(adapter, its diffusers folder, the original-layout .ckpt, the same as .safetensors)."""
    adapter = random_adapter(seed=3, **VERSIONS[request.param])
    root = tmp_path_factory.mktemp(request.param)
    adapter.save_pretrained(root / "diffusers")
    state = adapter_to_original(adapter.state_dict())
    torch.save(state, root / f"mm_sd_v15_{request.param}.ckpt")
    save_file(state, str(root / f"mm_sd_v15_{request.param}.safetensors"))
    return adapter, root / "diffusers", root / f"mm_sd_v15_{request.param}.ckpt", root / f"mm_sd_v15_{request.param}.safetensors"


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_original_checkpoints_load_to_the_same_weights_as_diffusers_converter(original):
    adapter, folder, ckpt, st = original
    for path in (ckpt, st):
        ours = load_motion_adapter(str(path))
        assert ours.config.motion_max_seq_length == adapter.config.motion_max_seq_length
        assert ours.config.use_motion_mid_block == adapter.config.use_motion_mid_block
        _assert_same_weights(ours, adapter)
    # the reference: diffusers' own single-file loader, given the true config
    stock = MotionAdapter.from_single_file(str(st), config=str(folder))
    _assert_same_weights(load_motion_adapter(str(st)), stock)


def test_original_checkpoint_generates_like_the_diffusers_adapter(original, tiny_model_dir):
    _, folder, ckpt, _ = original
    kw = dict(seed=4, frames=3, height=64, width=64, steps=2)
    outs = []
    for adapter in (folder, ckpt):
        pipe = load_pipeline(ModelSpec(base=str(tiny_model_dir), motion_adapter=str(adapter)), device="cpu")
        pipe.set_progress_bar_config(disable=True)
        outs.append(generate_video(pipe, "a dog", **kw))
    assert np.array_equal(outs[0], outs[1])


def test_diffusers_layout_file_without_config_reads_its_layout(tmp_path):
    """AnimateDiff-Lightning ships a bare diffusers-layout .safetensors; v3-like (no mid block) must still load."""
    adapter = random_adapter(seed=5, max_frames=32, mid_block=False)
    path = tmp_path / "animatediff_lightning_4step_diffusers.safetensors"
    save_file(adapter.state_dict(), str(path))
    _assert_same_weights(load_motion_adapter(str(path)), adapter)


def test_a_file_that_is_not_a_motion_module_says_what_it_holds(tmp_path, tiny_model_dir):
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(ValueError, match="not a motion module: it holds a LoRA"):
        load_motion_adapter(str(lora))
    sd = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}}, sd)
    with pytest.raises(ValueError, match="full Stable Diffusion checkpoint"):
        load_motion_adapter(str(sd))


def test_a_pickle_carrying_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "mm_sd_v15_v2.ckpt"
    with open(path, "wb") as fh:
        torch.save({"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": torch.zeros(2), "x": CreatesFile(marker)}, fh)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refused without running it.*io.open|would call"):
        load_motion_adapter(str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: plain unpickling runs it
    assert marker.exists()
    os.remove(marker)


def test_adapter_of_another_unet_is_refused(tmp_path, tiny_model_dir):
    adapter = MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=1)
    path = tmp_path / "mm_sdxl.safetensors"
    save_file(adapter_to_original(adapter.state_dict()), str(path))
    with pytest.raises(ValueError, match="channels"):
        load_pipeline(ModelSpec(base=str(tiny_model_dir), motion_adapter=str(path)), device="cpu")
