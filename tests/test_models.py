import json

import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter

from magicme.generate import generate_video
from magicme.models import ModelNotFoundError, ModelSpec, fingerprint, load_pipeline, tiny_components


def test_tiny_preset_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_components()
    after = torch.rand(1)
    b = tiny_components()
    assert torch.equal(before, after)
    for name in ("unet", "vae", "text_encoder", "motion_adapter"):
        for (k, x), (_, y) in zip(a[name].state_dict().items(), b[name].state_dict().items()):
            assert torch.equal(x, y), (name, k)


def test_tiny_tokenizer_is_clip_bpe():
    tok = tiny_components()["tokenizer"]
    ids = tok("a photo of a dog").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).strip() == "a photo of a dog"
    assert len(tok.tokenize("photo")) == 1  # learned merges, not bytes


def test_saved_tiny_model_loads_in_stock_diffusers(tiny_model_dir, tiny_pipe):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    adapter = MotionAdapter.from_pretrained(tiny_model_dir / "motion_adapter")
    stock = AnimateDiffPipeline.from_pretrained(tiny_model_dir, motion_adapter=adapter)
    for k, v in tiny_pipe.unet.state_dict().items():
        assert torch.equal(stock.unet.state_dict()[k], v), k


def test_local_folder_loads_through_our_loader(tiny_model_dir, tiny_pipe):
    pipe = load_pipeline(ModelSpec(base=str(tiny_model_dir)), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(seed=1, frames=3, height=64, width=64, steps=2, gamma=0.15)
    assert np.array_equal(generate_video(pipe, "a dog", **kw), generate_video(tiny_pipe, "a dog", **kw))
    fp = fingerprint(str(tiny_model_dir))
    assert fp["source"] == "local" and len(fp["fingerprint"]) == 16


def test_missing_models_give_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="--base tiny"):
        ModelSpec(base=str(tmp_path / "nowhere")).check()
    with pytest.raises(ModelNotFoundError, match="no such checkpoint"):
        ModelSpec(base=str(tmp_path / "x.safetensors")).check()
    with pytest.raises(ModelNotFoundError, match="not reachable on the hub"):
        load_pipeline(ModelSpec(base="nobody-here/no-such-model-xyz"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="not a readable diffusers model"):
        load_pipeline(ModelSpec(base=str(tmp_path / "empty")), device="cpu")
    with pytest.raises(ValueError, match="scheduler"):
        ModelSpec(scheduler="plms").check()


@pytest.mark.parametrize("name", ["euler", "dpm"])
def test_other_schedulers_run(name, tmp_path):
    pipe = load_pipeline(ModelSpec(scheduler=name), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    frames = generate_video(pipe, "a dog", frames=2, height=64, width=64, steps=2)
    assert frames.shape == (2, 64, 64, 3) and np.isfinite(frames).all()
