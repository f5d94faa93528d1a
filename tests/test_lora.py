"""LoRAs and motion LoRAs in every layout users have, checked against merging the weights by hand."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_files import (
    animatediff_motion_lora_layout,
    diffusers_layout,
    kohya_layout,
    merge,
    random_lora,
    random_motion_lora,
)
from magicme.generate import GenerateConfig, generate, generate_video
from magicme.identity import IdentityInfo, save_identity
from magicme.lora import parse_lora
from magicme.models import ModelSpec, load_pipeline, tiny_components
from magicme.video import read_sidecar

KW = dict(seed=3, frames=2, height=64, width=64, steps=2, gamma=0.15)


def _video(spec: ModelSpec, prompt="a dog", identities=(), lora=None, scale=1.0):
    from magicme.identity import load_identities

    pipe = load_pipeline(spec, device="cpu")
    if lora is not None:
        merge(pipe, lora, scale)
    pipe.set_progress_bar_config(disable=True)
    load_identities(pipe, list(identities))
    return generate_video(pipe, prompt, **KW)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    parts = tiny_components()
    from diffusers import AnimateDiffPipeline

    pipe = AnimateDiffPipeline(**parts)
    root = tmp_path_factory.mktemp("lora")
    spatial = random_lora(pipe.unet, pipe.text_encoder)
    motion = random_motion_lora(pipe.unet)
    save_file(kohya_layout(spatial), str(root / "style_kohya.safetensors"))
    save_file(diffusers_layout(spatial), str(root / "pytorch_lora_weights.safetensors"))
    torch.save(animatediff_motion_lora_layout(motion), root / "v2_lora_ZoomIn.ckpt")
    save_file({f"unet.{k}": v for k, v in animatediff_motion_lora_layout(motion).items()}, str(root / "zoom_diffusers.safetensors"))
    return dict(root=root, spatial=spatial, motion=motion)


def test_kohya_and_diffusers_layouts_change_the_output_as_merged_weights_do(lora):
    root = lora["root"]
    plain = _video(ModelSpec())
    merged = _video(ModelSpec(), lora=lora["spatial"])
    kohya = _video(ModelSpec(loras=(str(root / "style_kohya.safetensors"),)))
    diffusers = _video(ModelSpec(loras=(str(root / "pytorch_lora_weights.safetensors"),)))
    assert np.abs(merged - plain).mean() > 1e-3  # the LoRA does something
    np.testing.assert_allclose(kohya, merged, atol=2e-5)
    np.testing.assert_allclose(diffusers, merged, atol=2e-5)
    half = _video(ModelSpec(loras=(f"{root / 'style_kohya.safetensors'}:0.5",)))
    np.testing.assert_allclose(half, _video(ModelSpec(), lora=lora["spatial"], scale=0.5), atol=2e-5)


def test_motion_lora_original_and_diffusers_layouts_match_merged_weights(lora):
    root = lora["root"]
    merged = _video(ModelSpec(), lora=lora["motion"], scale=0.6)
    for name in ("v2_lora_ZoomIn.ckpt", "zoom_diffusers.safetensors"):
        np.testing.assert_allclose(_video(ModelSpec(motion_loras=(f"{root / name}:0.6",))), merged, atol=2e-5)


def test_lora_and_identity_both_apply(lora, tmp_path):
    """The paper's "mix and match" (§1): a style LoRA and an identity in one video."""
    ident = save_identity(tmp_path / "id.safetensors", torch.randn(2, 32, generator=torch.Generator().manual_seed(7)),
                          IdentityInfo(token="<v*>", class_word="dog", num_vectors=2, hidden_size=32))
    prompt = "a <v*> dog"
    spec = ModelSpec(loras=(str(lora["root"] / "style_kohya.safetensors"),))
    both = _video(spec, prompt, [ident])
    reference = _video(ModelSpec(), prompt, [ident], lora=lora["spatial"])
    np.testing.assert_allclose(both, reference, atol=2e-5)
    assert np.abs(both - _video(ModelSpec(), prompt, [ident])).mean() > 1e-3  # the LoRA applied
    assert np.abs(both - _video(spec, "a dog")).mean() > 1e-3  # the identity applied


def test_wrong_kind_of_file_is_one_clear_error(lora, tmp_path):
    root = lora["root"]
    with pytest.raises(ValueError, match="motion LoRA; pass it with --motion-lora"):
        load_pipeline(ModelSpec(loras=(str(root / "v2_lora_ZoomIn.ckpt"),)), device="cpu")
    with pytest.raises(ValueError, match="not a motion LoRA: it holds a LoRA; pass it with --lora"):
        load_pipeline(ModelSpec(motion_loras=(str(root / "style_kohya.safetensors"),)), device="cpu")
    other = tmp_path / "sdxl_style.safetensors"
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 8), "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 2)}, str(other))
    with pytest.raises(ValueError, match="sdxl_style"):
        load_pipeline(ModelSpec(loras=(str(other),)), device="cpu")
    with pytest.raises(FileNotFoundError, match="--lora"):
        ModelSpec(loras=(str(tmp_path / "missing.safetensors:0.5"),)).check()


def test_parse_lora_scale():
    assert parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora("a/b.safetensors:0.7") == ("a/b.safetensors", 0.7)
    assert parse_lora(r"C:\loras\b.safetensors") == (r"C:\loras\b.safetensors", 1.0)


def test_run_record_names_each_lora_with_fingerprint_and_scale(lora, tmp_path):
    root = lora["root"]
    spec = ModelSpec(loras=(f"{root / 'style_kohya.safetensors'}:0.8",), motion_loras=(str(root / "v2_lora_ZoomIn.ckpt"),))
    out = generate(GenerateConfig(prompts=["a dog"], frames=2, steps=1, models=spec), tmp_path / "v.gif", quiet=True, device="cpu")[0]
    record = read_sidecar(out)
    (style,) = record["models"]["loras"]
    assert style["scale"] == 0.8 and len(style["fingerprint"]) == 16 and style["name"].endswith("style_kohya.safetensors")
    (motion,) = record["models"]["motion_loras"]
    assert motion["scale"] == 1.0 and motion["name"].endswith("v2_lora_ZoomIn.ckpt")


def test_run_config_takes_loras_relative_to_the_file(lora, tmp_path):
    import shutil

    import yaml

    from magicme.demo import write_sample_identity
    from magicme.run import load_chain_config

    write_sample_identity(tmp_path / "photos", count=1, size=64)
    shutil.copy(lora["root"] / "style_kohya.safetensors", tmp_path / "style.safetensors")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "images": "photos", "class_word": "toy", "prompt": "a <v*> toy", "work_dir": "work",
        "models": {"base": "tiny", "loras": ["style.safetensors:0.7"], "freeu": True, "clip_skip": 1},
        "prepare": {"resolution": 64, "segmenter": {"method": "grabcut"}},
    }))
    cfg = load_chain_config(tmp_path / "run.yaml")
    assert cfg.models.loras == (f"{tmp_path / 'style.safetensors'}:0.7",)
    assert cfg.models.freeu == (1.5, 1.6, 0.9, 0.2) and cfg.models.clip_skip == 1
    hash(cfg.models)  # the UI and the chain key loaded pipelines by the spec


def test_cli_wires_every_format_option(lora, tmp_path, tiny_model_dir, capsys):
    """One `magicme generate` with a reference-layout identity, --token, a LoRA, a motion LoRA, FreeU, clip skip,
    DPM++ 2M Karras and an original-layout motion module; then one-line errors for wrong files."""
    from animatediff_checkpoint import adapter_to_original, random_adapter
    from magicme.cli import main

    root = lora["root"]
    ref = tmp_path / "last.pt"
    torch.save({"string_to_param": {"*": torch.randn(4, 32)}}, ref)
    adapter = random_adapter(max_frames=24, mid_block=False)
    torch.save(adapter_to_original(adapter.state_dict()), tmp_path / "mm_sd_v15.ckpt")
    out = tmp_path / "clip.gif"
    args = ["generate", "--prompt", "a <me> man", "--identity", str(ref), "--token", "<me>", "--frames", "2", "--steps", "2",
            "--lora", f"{root / 'style_kohya.safetensors'}:0.5", "--motion-lora", str(root / "v2_lora_ZoomIn.ckpt"),
            "--freeu", "--clip-skip", "1", "--scheduler", "dpmpp-2m-karras", "--base", str(tiny_model_dir),
            "--motion-adapter", str(tmp_path / "mm_sd_v15.ckpt"), "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    models = read_sidecar(out)["models"]
    assert models["identities"][0]["token"] == "<me>" and models["loras"][0]["scale"] == 0.5
    assert models["freeu"] == {"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2} and models["clip_skip"] == 1
    assert models["scheduler_config"]["use_karras_sigmas"] is True
    assert main(args[:-1] + [str(tmp_path / "b.gif"), "--frames", "30", "--context-length", "30"]) == 2  # v1: 24 frames
    assert "maximum of 24 frames" in capsys.readouterr().err
    bad = ["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--out", str(tmp_path / "c.gif"), "--quiet"]
    assert main(bad + ["--lora", str(root / "v2_lora_ZoomIn.ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--motion-lora" in err
    assert main(bad + ["--base", str(tiny_model_dir), "--motion-adapter", str(root / "style_kohya.safetensors")]) == 2
    assert "not a motion module: it holds a LoRA" in capsys.readouterr().err
