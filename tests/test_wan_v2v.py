"""V2V, Face VCD and Tiled VCD on Wan: stock WanVideoToVideoPipeline fed our latents, with identities and the noise prior."""

import json

import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanVideoToVideoPipeline

from magicme.cli import main
from magicme.face import FaceConfig, face_vcd
from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec
from magicme.noise_prior import latent_frame_covariance
from magicme.upscale import UpscaleConfig
from magicme.v2v import V2VConfig, v2v
from magicme.video import read_sidecar, read_video, write_video
from magicme.wan import tiny_wan_components
from magicme.wan_identity import load_wan_identities
from magicme.wan_v2v import expand_loaded_tokens, start_latents, wan_noised_latents, wan_partial_denoise, wan_video_pipeline

WAN = ModelSpec(base="tiny", backbone="wan")


@pytest.fixture(scope="module")
def pipes():
    """(T2V pipeline, our V2V pipeline on its modules, a stock V2V pipeline built by hand on the same modules)."""
    pipe = WanPipeline(**tiny_wan_components())
    pipe.set_progress_bar_config(disable=True)
    stock = WanVideoToVideoPipeline(**{k: getattr(pipe, k) for k in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")})
    stock.set_progress_bar_config(disable=True)
    return pipe, wan_video_pipeline(pipe), stock


def clips_of(batch, frames, side=32, seed=0):
    return np.random.default_rng(seed).random((batch, frames, side, side, 3)).astype(np.float32)


def test_gamma_zero_is_stock_wan_video_to_video_bit_for_bit(pipes):
    _, ours, stock = pipes
    clips = clips_of(2, 9)
    got = wan_partial_denoise(ours, clips, "a dog", strength=0.6, seeds=[3, 4], steps=4, gamma=0.0)
    want = stock(video=clips, prompt=["a dog"] * 2, height=32, width=32, num_inference_steps=4, strength=0.6,
                 generator=[torch.Generator().manual_seed(s) for s in (3, 4)], output_type="np").frames
    assert got.shape == clips.shape and np.array_equal(got, np.asarray(want))
    one = stock(video=clips[1], prompt="a dog", height=32, width=32, num_inference_steps=4, strength=0.6,
                generator=torch.Generator().manual_seed(4), output_type="np").frames[0]
    assert np.allclose(got[1], one, atol=1e-5)  # a clip's noise does not depend on its batch (only float rounding does)
    prior = wan_partial_denoise(ours, clips, "a dog", strength=0.6, seeds=[3, 4], steps=4, gamma=0.5)
    assert not np.array_equal(prior, got)


def test_start_latents_are_the_stock_encoding_noised_at_the_strengths_timestep(pipes):
    _, ours, stock = pipes
    video = ours.video_processor.preprocess_video(clips_of(1, 9), height=32, width=32)
    captured = {}

    def grab(pipe, i, t, kwargs):  # the stock's own start: prepare_latents' output before the first step
        captured.setdefault("t", t)
        return kwargs

    stock.prepare_latents = (lambda original: lambda *a, **k: captured.setdefault("x", original(*a, **k)))(stock.prepare_latents)
    try:
        stock(video=clips_of(1, 9), prompt="a dog", height=32, width=32, num_inference_steps=10, strength=0.3,
              generator=torch.Generator().manual_seed(7), output_type="latent", callback_on_step_end=grab)
    finally:
        del stock.prepare_latents
    x = wan_noised_latents(ours, video, 0.3, 10, 0.0, [torch.Generator().manual_seed(7)])
    assert torch.equal(x, captured["x"])
    # flow matching: x_t = (1 − σ) x_0 + σ ε at the first of int(10 × 0.3) = 3 remaining steps
    ours.scheduler.set_timesteps(10)
    sigma = ours.scheduler.sigmas[10 - 3]
    assert captured["t"] == ours.scheduler.timesteps[10 - 3]
    eps = (x - (1 - sigma) * start_latents(ours.vae, video)) / sigma
    assert torch.allclose(eps, torch.randn(x.shape, generator=torch.Generator().manual_seed(7)), atol=1e-4)


def test_noise_has_the_latent_prior_covariance_per_video_frame_gamma(pipes):
    _, ours, _ = pipes
    gamma = 0.6
    video = ours.video_processor.preprocess_video(clips_of(8, 13, side=64), height=64, width=64)
    x0 = start_latents(ours.vae, video)
    ours.scheduler.set_timesteps(4)
    sigma = ours.scheduler.sigmas[0]
    x = wan_noised_latents(ours, video, 1.0, 4, gamma, [torch.Generator().manual_seed(s) for s in range(8)])
    eps = ((x - (1 - sigma) * x0) / sigma).transpose(0, 2).reshape(4, -1).double()  # latent frames × samples
    want = latent_frame_covariance(4, gamma)  # 13 video frames → 4 latent frames (1 + 3 groups of 4)
    assert torch.allclose(torch.corrcoef(eps), want, atol=0.04)
    assert want[1, 2] < gamma  # groups of four frames are less alike than neighbouring video frames


def test_any_frame_count_comes_back_whole_and_steps_follow_strength(pipes):
    _, ours, _ = pipes
    steps = []
    out = wan_partial_denoise(ours, clips_of(1, 6), "a dog", strength=0.5, seeds=[0], steps=6,
                              step_callback=lambda p, i, t, kw: steps.append(i) or kw)
    assert out.shape == (1, 6, 32, 32, 3) and steps == [0, 1, 2]  # 6 → 9 frames (1 + 4k) and cut back; int(6 × 0.5) steps
    with pytest.raises(ValueError, match="multiples of 16"):
        wan_partial_denoise(ours, clips_of(1, 5, side=24), "a dog", strength=0.5, seeds=[0], steps=2)


def test_token_identity_words_are_expanded_from_the_tokenizer(pipes, tmp_path):
    pipe = WanPipeline(**tiny_wan_components())
    path = save_identity(tmp_path / "id.safetensors", torch.randn(3, 32),
                         IdentityInfo(token="<v*>", class_word="toy", num_vectors=3, hidden_size=32, backbone="wan"))
    load_wan_identities(pipe, [str(path)])
    assert expand_loaded_tokens(pipe.tokenizer, "a <v*> toy") == "a <v*> <v*>_1 <v*>_2 toy"
    assert expand_loaded_tokens(pipe.tokenizer, "a <v*>2 toy") == "a <v*>2 toy"  # whole words only
    assert expand_loaded_tokens(pipes[0].tokenizer, "a <v*> toy") == "a <v*> toy"  # nothing loaded there


def wan_token_identity(folder):
    return str(save_identity(folder / "wan_id.safetensors", torch.randn(3, 32) * 5,
                             IdentityInfo(token="<v*>", class_word="person", num_vectors=3, hidden_size=32, backbone="wan")))


def test_v2v_face_upscale_end_to_end_on_tiny_wan(tmp_path):
    frames = np.full((5, 96, 96, 3), 140, np.uint8)
    for i, frame in enumerate(frames):  # a light disc moving right: the "face" the stub detector reports
        yy, xx = np.mgrid[:96, :96]
        frame[(yy - 48) ** 2 + (xx - 40 - 2 * i) ** 2 < 18**2] = 200
    video = write_video(frames, tmp_path / "in")  # PNG frames: lossless
    ident = wan_token_identity(tmp_path)
    common = dict(prompt="a photo of <v*> person", identities=[ident], steps=4, models=WAN)

    out = v2v(V2VConfig(**common), video, tmp_path / "v2v", quiet=True, device="cpu")
    rec = read_sidecar(out)
    assert read_video(out).shape == frames.shape and rec["models"]["backbone"] == "wan" and rec["dtype"] == "fp32"
    assert rec["models"]["identities"][0]["token"] == "<v*>" and rec["models"]["base"]["backbone"] == "wan"

    out = face_vcd(FaceConfig(**common), video, tmp_path / "face", detector=lambda f: [(22.0, 30.0, 36.0, 36.0)],
                   quiet=True, device="cpu")
    result = read_video(out)
    assert result.shape == frames.shape and not np.array_equal(result, frames)
    assert np.array_equal(result[:, :, 80:], frames[:, :, 80:])  # right of the face square: untouched
    assert read_sidecar(out)["faces"] == 1


def test_cli_v2v_face_upscale_on_wan(tmp_path, capsys):
    frames = (np.random.default_rng(0).random((5, 48, 48, 3)) * 255).astype(np.uint8)
    video = str(write_video(frames, tmp_path / "in"))
    base = ["--base", "tiny", "--backbone", "wan", "--video", video, "--prompt", "a dog", "--steps", "4", "--quiet", "--device", "cpu"]
    assert main(["v2v", *base, "--out", str(tmp_path / "v.gif")]) == 0
    assert read_video(tmp_path / "v.gif").shape == frames.shape
    assert main(["face", *base, "--out", str(tmp_path / "f.gif")]) == 0  # no face in noise: written unchanged
    assert main(["upscale", *base, "--steps", "5", "--out", str(tmp_path / "u.gif")]) == 0
    assert "Wan2.1-T2V-1.3B" in capsys.readouterr().err  # the tiny warning names real Wan weights
    rec = json.loads((tmp_path / "u.gif.json").read_text())
    assert read_video(tmp_path / "u.gif").shape == (5, 96, 96, 3)
    assert rec["controlnet_model"] is None and "no ControlNet Tile" in rec["controlnet_note"]
    assert rec["tile_size"] == [64, 64] and rec["tiles"] == 4 and rec["models"]["backbone"] == "wan"
    assert main(["upscale", *base, "--steps", "5", "--controlnet", "lllyasviel/control_v11f1e_sd15_tile", "--out", str(tmp_path / "c.gif")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--controlnet" in err[0] and "SD-1.5" in err[0]
    assert not (tmp_path / "c.gif").exists()


def test_wan_sizes_are_checked_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="--tile must be a positive multiple of 16"):
        UpscaleConfig(prompt="a dog", tile=40, models=WAN).check()
    with pytest.raises(ValueError, match="--face-size must be a positive multiple of 16"):
        FaceConfig(prompt="a dog", face_size=72, models=WAN).check()
    UpscaleConfig(prompt="a dog", tile=48, controlnet="none", models=WAN).check()  # --controlnet none is what Wan does anyway
