"""The Wan backbone: tiny preset and its tokenizer, loader, backbone detection, T2V against stock WanPipeline."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from magicme.cli import main
from magicme.generate import GenerateConfig, generate
from magicme.models import ModelSpec, load_pipeline
from magicme.noise_prior import latent_noise_prior
from magicme.tokenizer import tiny_umt5_tokenizer
from magicme.wan import detect_backbone, save_tiny_wan_model, tiny_wan_components, wan_latent_shape
from magicme.wan_generate import wan_frame_count, wan_video

CALL = dict(height=32, width=32, num_inference_steps=2, guidance_scale=5.0)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_wan_model(tmp_path_factory.mktemp("wan") / "model")


@pytest.fixture(scope="module")
def wan_pipe():
    pipe = WanPipeline(**tiny_wan_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_umt5_tokenizer_has_umt5s_form_and_reloads_in_stock_classes(tmp_path):
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = tiny_umt5_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)  # as google/umt5-xxl
    ids = tok("a photo of a dog").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁dog", "</s>"]  # whole words, </s> appended
    assert tok.unk_token_id not in tok("Zebra crossing #42, 100% (ok)!").input_ids  # any ASCII prompt is covered
    tok.save_pretrained(tmp_path)
    for cls in (AutoTokenizer, T5TokenizerFast):
        again = cls.from_pretrained(tmp_path)
        assert again("a <v*> dog at the beach").input_ids == tok("a <v*> dog at the beach").input_ids


def test_tiny_preset_saves_as_a_stock_wan_folder(wan_dir, tiny_model_dir):
    index = json.loads((wan_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    pipe = WanPipeline.from_pretrained(wan_dir)
    parts = tiny_wan_components()
    assert pipe.text_encoder.get_input_embeddings().weight.shape[0] > len(pipe.tokenizer)  # padded, as UMT5's
    assert torch.equal(pipe.transformer.proj_out.weight, parts["transformer"].proj_out.weight)  # seeded
    assert detect_backbone(str(wan_dir)) == "wan" and detect_backbone(str(tiny_model_dir)) == "animatediff"
    assert ModelSpec(base=str(wan_dir)).resolved_backbone() == "wan"
    assert ModelSpec(base="tiny", backbone="wan").base_fingerprint()["backbone"] == "wan"


def test_loader_refuses_what_is_not_wan_t2v(wan_dir, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="not a Wan text-to-video model"):
        ModelSpec(base=str(tiny_model_dir), backbone="wan").check()
    i2v = tmp_path / "i2v"
    i2v.mkdir()
    (i2v / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    with pytest.raises(ValueError, match="WanImageToVideoPipeline"):
        ModelSpec(base=str(i2v)).check()
    for kw, flag in ((dict(motion_adapter="x/y"), "--motion-adapter"), (dict(preset="fast"), "--preset"), (dict(scheduler="euler"), "--scheduler")):
        with pytest.raises(ValueError, match=flag):
            ModelSpec(base=str(wan_dir), **kw).check()
    pipe = load_pipeline(ModelSpec(base=str(wan_dir)), device="cpu")
    assert isinstance(pipe, WanPipeline) and pipe.vae.dtype == torch.float32


def test_gamma_zero_is_stock_wan_pipeline_bit_for_bit(wan_pipe):
    ours = wan_video(wan_pipe, "a dog running", seed=5, frames=9, height=32, width=32, steps=2, gamma=0.0)
    stock = wan_pipe("a dog running", num_frames=9, generator=torch.Generator().manual_seed(5), output_type="np", **CALL).frames[0]
    assert ours.shape == (9, 32, 32, 3) and np.array_equal(ours, stock)
    prior = wan_video(wan_pipe, "a dog running", seed=5, frames=9, height=32, width=32, steps=2, gamma=0.5)
    assert not np.array_equal(prior, stock)
    # γ > 0: exactly the stock pipeline started from our latents (same generator afterwards)
    g = torch.Generator().manual_seed(5)
    latents = latent_noise_prior(wan_latent_shape(wan_pipe, 1, 9, 32, 32), 0.5, generator=g, dtype=torch.float32)
    stock_prior = wan_pipe("a dog running", num_frames=9, generator=g, latents=latents, output_type="np", **CALL).frames[0]
    assert np.array_equal(prior, stock_prior)


def test_any_frame_count_runs_as_the_next_wan_length(wan_pipe):
    assert [wan_frame_count(n) for n in (1, 2, 5, 16, 81)] == [1, 5, 5, 17, 81]
    assert wan_video(wan_pipe, "a dog", frames=6, height=32, width=32, steps=1).shape == (6, 32, 32, 3)


def test_generate_on_the_tiny_wan_preset_writes_video_and_record(tmp_path):
    cfg = GenerateConfig(prompts=["a dog"], frames=5, steps=1, height=32, width=48, models=ModelSpec(base="tiny", backbone="wan"))
    (path,) = generate(cfg, tmp_path / "dog.mp4", quiet=True, device="cpu")
    record = json.loads((tmp_path / "dog.mp4.json").read_text())
    assert path.is_file() and record["backbone"] == "wan" and record["generated_frames"] == 5
    assert record["models"]["base"]["backbone"] == "wan" and record["models"]["scheduler_config"]["flow_shift"] == 3.0
    for kw, flag in ((dict(prompt_at={4: "a cat"}), "--prompt-at"), (dict(free_init=2), "--free-init"), (dict(height=40), "--height")):
        with pytest.raises(ValueError, match=flag):
            generate(GenerateConfig(prompts=["a dog"], models=ModelSpec(base="tiny", backbone="wan"), **kw), tmp_path / "x.mp4")


def test_cli_generate_with_a_wan_folder(wan_dir, tmp_path, capsys):
    out = tmp_path / "clip.gif"
    assert main(["generate", "--base", str(wan_dir), "--prompt", "a dog", "--frames", "5", "--steps", "1",
                 "--height", "32", "--width", "32", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    record = json.loads(out.with_name("clip.gif.json").read_text())
    assert record["fps"] == 16 and record["backbone"] == "wan"  # Wan's own frame rate by default
    assert main(["generate", "--base", str(wan_dir), "--prompt", "a dog", "--motion-adapter", "a/b", "--out", str(tmp_path / "y.mp4")]) == 2
    assert "--motion-adapter" in capsys.readouterr().err


def test_video_to_video_stages_on_wan_name_a_missing_video_in_one_line(tmp_path, capsys):
    clip = tmp_path / "in.gif"
    for stage in ("v2v", "face", "upscale"):  # they run on Wan (tests/test_wan_v2v.py); bad input is still one line
        assert main([stage, "--video", str(clip), "--prompt", "a dog", "--backbone", "wan", "--out", str(tmp_path / "o.mp4")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--video" in err and not (tmp_path / "o.mp4").exists()
