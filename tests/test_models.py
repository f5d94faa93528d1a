import json

import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter

from magicme.generate import generate_video
from magicme.models import ModelNotFoundError, ModelSpec, fingerprint, load_pipeline, make_scheduler, tiny_components


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


def test_dpmpp_2m_karras_uses_karras_sigmas():
    """Karras et al. 2022 eq. 5: σ_i = (σmax^(1/ρ) + i/(n−1)·(σmin^(1/ρ) − σmax^(1/ρ)))^ρ, ρ = 7."""
    from diffusers import DPMSolverMultistepScheduler

    s = make_scheduler("dpmpp-2m-karras")
    assert isinstance(s, DPMSolverMultistepScheduler)
    assert (s.config.algorithm_type, s.config.solver_order, s.config.use_karras_sigmas) == ("dpmsolver++", 2, True)
    s.set_timesteps(20)
    all_sigmas = ((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5
    lo, hi, rho = float(all_sigmas[0]), float(all_sigmas[-1]), 7.0
    ramp = np.linspace(0, 1, 20)
    expected = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    np.testing.assert_allclose(s.sigmas[:-1].numpy(), expected, rtol=1e-5)
    plain = make_scheduler("dpmpp-2m")
    assert not plain.config.use_karras_sigmas and plain.config.algorithm_type == "dpmsolver++"


def test_preset_reference_is_the_reference_recipe():
    from magicme.generate import GenerateConfig

    spec = ModelSpec(preset="reference")
    assert spec.scheduler_name() == "dpmpp-2m-karras" and spec.freeu_values() == (1.1, 1.2, 0.9, 0.4)
    cfg = GenerateConfig(prompts=["a dog"], models=spec).resolved()
    assert (cfg.steps, cfg.guidance, cfg.gamma) == (20, 8.0, 0.15)
    assert ModelSpec(preset="reference", freeu=(1.0, 1.0, 1.0, 1.0)).freeu_values() == (1.0, 1.0, 1.0, 1.0)


def test_freeu_matches_stock_enable_freeu(tiny_pipe):
    kw = dict(seed=1, frames=2, height=64, width=64, steps=2)
    ours = load_pipeline(ModelSpec(freeu=True), device="cpu")
    ours.set_progress_bar_config(disable=True)
    stock = load_pipeline(ModelSpec(), device="cpu")
    stock.set_progress_bar_config(disable=True)
    stock.enable_freeu(b1=1.5, b2=1.6, s1=0.9, s2=0.2)  # the SD-1.5 values of FreeU's authors
    a = generate_video(ours, "a dog", **kw)
    assert np.array_equal(a, generate_video(stock, "a dog", **kw))
    assert not np.array_equal(a, generate_video(tiny_pipe, "a dog", **kw))
    with pytest.raises(ValueError, match="--freeu"):
        ModelSpec(freeu=(1.0, 2.0)).check()


def test_clip_skip_is_the_final_normed_earlier_layer(tiny_pipe):
    """clip skip N: the hidden state N layers before the last, through the final layer norm (A1111/diffusers)."""
    pipe = load_pipeline(ModelSpec(clip_skip=1), device="cpu")
    ids = tiny_pipe.tokenizer("a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = tiny_pipe.text_encoder(ids, output_hidden_states=True)
        expected = tiny_pipe.text_encoder.final_layer_norm(out.hidden_states[-2])
        assert torch.allclose(pipe.text_encoder(ids)[0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="--clip-skip"):
        ModelSpec(clip_skip=-1).check()
    with pytest.raises(ValueError, match="only 2 layers"):
        load_pipeline(ModelSpec(clip_skip=2), device="cpu")


def test_context_beyond_the_motion_module_is_refused(tiny_model_dir):
    """Issue 12.8: more frames per pass than the motion module's positional table is one line, not a RuntimeError."""
    from magicme.generate import GenerateConfig
    from magicme.v2v import V2VConfig

    with pytest.raises(ValueError, match="--context-length 48 is above the motion module's maximum of 32"):
        GenerateConfig(prompts=["a dog"], frames=64, context_length=48).check()
    with pytest.raises(ValueError, match="--context 40 is above"):
        V2VConfig(prompt="a dog", context=40, models=ModelSpec(base=str(tiny_model_dir))).check()
    assert ModelSpec(base=str(tiny_model_dir)).max_frames() == 32


def test_lcm_preset_with_local_adapter(tiny_model_dir, tmp_path):
    """Issue 12.8: the preset's LoRA is looked up beside a local adapter, else named clearly when absent offline."""
    import shutil

    from lora_files import kohya_layout, random_lora
    from safetensors.torch import save_file

    local = tmp_path / "AnimateLCM"
    shutil.copytree(tiny_model_dir / "motion_adapter", local)
    spec = ModelSpec(base=str(tiny_model_dir), motion_adapter=str(local), preset="lcm")
    with pytest.raises(ModelNotFoundError, match="AnimateLCM weights 'wangfuyun/AnimateLCM/AnimateLCM_sd15_t2v_lora"):
        load_pipeline(spec, device="cpu")
    parts = tiny_components()
    save_file(kohya_layout(random_lora(parts["unet"], parts["text_encoder"])), str(local / "AnimateLCM_sd15_t2v_lora.safetensors"))
    pipe = load_pipeline(spec, device="cpu")
    assert pipe.get_active_adapters() == ["lcm"]
    with pytest.raises(ModelNotFoundError, match="--preset lcm needs the AnimateLCM weights 'wangfuyun/AnimateLCM'"):
        load_pipeline(ModelSpec(base=str(tiny_model_dir), preset="lcm"), device="cpu")


def test_tokenizer_of_clip_size():
    from magicme.tokenizer import tiny_clip_tokenizer

    small, big = tiny_clip_tokenizer(), tiny_clip_tokenizer(vocab_size=49408)
    assert len(big) == 49408 and (big.bos_token_id, big.eos_token_id) == (49406, 49407)  # CLIP's own ids
    text = "a photo of a dog running on the beach"
    assert big(text).input_ids[1:-1] == small(text).input_ids[1:-1]
