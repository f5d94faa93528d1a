import numpy as np
import pytest
import torch
from PIL import Image

from magicme.cli import main
from magicme.identity import IdentityInfo, save_identity
from magicme.upscale import tiny_controlnet
from magicme.v2v import control_frames, partial_denoise, partial_denoise_windows, prior_noise, start_timestep, video_pipeline
from magicme.video import read_sidecar, read_video, write_video


@pytest.fixture(scope="module")
def v2v_pipe(tiny_pipe):
    return video_pipeline(tiny_pipe)


def _clip(n=4, h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_gamma_zero_equals_stock_video_to_video_bit_for_bit(v2v_pipe):
    clip = _clip()
    stock = v2v_pipe(
        video=[Image.fromarray(f) for f in clip], prompt="a dog", strength=0.5, num_inference_steps=4,
        generator=torch.Generator().manual_seed(3), output_type="np",
    ).frames[0]
    ours = partial_denoise(v2v_pipe, clip[None].astype(np.float32) / 255, "a dog", strength=0.5, seeds=[3], steps=4, gamma=0.0)
    assert np.array_equal(ours[0], stock)
    correlated = partial_denoise(v2v_pipe, clip[None].astype(np.float32) / 255, "a dog", strength=0.5, seeds=[3], steps=4, gamma=0.5)
    assert np.abs(correlated[0] - stock).max() > 1e-2


def _static_clip(frames, size=64, seed=0):
    """One smooth random picture repeated: a clip that does not move."""
    import cv2

    small = np.random.default_rng(seed).random((8, 8, 3)).astype(np.float32)
    return np.stack([cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)] * frames)[None]


def test_long_clips_show_no_seam_at_window_boundaries(v2v_pipe):
    """A static clip twice the context: the frame-to-frame change across the window boundary is the change
    inside a window. γ near 1 makes the prior's noise nearly static, so windows with their own noise would
    jump (0.15 across against 0.04 inside before the fix, on this tiny model)."""
    clip = _static_clip(16)
    out = partial_denoise_windows(v2v_pipe, clip, "a dog", context=8, seeds=[0], strength=0.5, steps=4, gamma=0.99)
    assert out.shape == clip.shape
    change = np.abs(np.diff(out[0], axis=0)).mean(axis=(1, 2, 3))  # change from frame t to t+1
    inside = np.median(change)
    assert change[7] < 1.5 * inside and change.max() < 1.5 * inside, change.round(4)


def test_windows_are_one_draw_per_clip_and_leave_the_pipeline_stock(v2v_pipe):
    clips = np.random.default_rng(1).random((2, 7, 64, 64, 3), dtype=np.float32)
    kw = dict(strength=0.5, steps=2, gamma=0.2)
    short = partial_denoise(v2v_pipe, clips[:, :4], "a dog", seeds=[4, 5], **kw)
    assert np.array_equal(partial_denoise_windows(v2v_pipe, clips[:, :4], "a dog", context=4, seeds=[4, 5], **kw), short)
    windows = partial_denoise_windows(v2v_pipe, clips, "a dog", context=4, seeds=[4, 5], **kw)
    assert windows.shape == clips.shape
    alone = partial_denoise_windows(v2v_pipe, clips[1:], "a dog", context=4, seeds=[5], **kw)
    np.testing.assert_allclose(windows[1:], alone, atol=1e-5)  # a clip's result does not depend on its batch
    other_seed = partial_denoise_windows(v2v_pipe, clips[1:], "a dog", context=4, seeds=[6], **kw)
    assert np.abs(other_seed - alone).max() > 1e-3
    assert not v2v_pipe.free_noise_enabled  # the windows are undone: the next short clip runs stock
    assert np.array_equal(partial_denoise(v2v_pipe, clips[:, :4], "a dog", seeds=[4, 5], **kw), short)


def test_prior_noise_has_the_frame_covariance():
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    noise = prior_noise((2, 6, 4, 32, 32), 0.6, gens, "cpu", torch.float32)  # (B, F, C, h, w)
    x = noise.transpose(0, 1).reshape(6, -1)
    cov = (x @ x.T / x.shape[1]).numpy()
    expected = 0.6 ** np.abs(np.subtract.outer(np.arange(6), np.arange(6)))
    np.testing.assert_allclose(cov, expected, atol=0.03)
    again = prior_noise((1, 6, 4, 32, 32), 0.6, [torch.Generator().manual_seed(1)], "cpu", torch.float32)
    assert torch.equal(again[0], noise[1])  # each clip's noise comes from its own generator


def test_start_timestep_follows_strength(v2v_pipe):
    v2v_pipe.scheduler.set_timesteps(10)
    full = v2v_pipe.scheduler.timesteps
    assert start_timestep(v2v_pipe, 10, 1.0).item() == full[0].item()
    assert start_timestep(v2v_pipe, 10, 0.2).item() == full[8].item()  # int(10 × 0.2) = 2 steps left


def test_control_frames_land_on_their_clip_and_frame(tiny_pipe):
    """The ControlNet pipeline flattens conditions frame-major; ours must come out clip-major (B·F)."""
    pipe = video_pipeline(tiny_pipe, tiny_controlnet())
    b, f = 3, 4
    clips = np.zeros((b, f, 16, 16, 3), np.float32)
    for i in range(b):
        for j in range(f):
            clips[i, j] = (i * f + j) / 100
    prepared = pipe.prepare_conditioning_frames(
        control_frames(clips), width=16, height=16, batch_size=b * f, num_videos_per_prompt=1,
        device="cpu", dtype=torch.float32,
    )
    assert prepared.shape == (b * f, 3, 16, 16)
    np.testing.assert_allclose(prepared[:, 0, 0, 0].numpy(), np.arange(b * f) / 100, atol=1e-6)


def _identity(path):
    return save_identity(path, torch.randn(2, 32), IdentityInfo(token="<v*>", class_word="person", num_vectors=2, hidden_size=32))


def test_v2v_cli_end_to_end(tmp_path, capsys):
    video = write_video(_clip(3, 44, 52), tmp_path / "in")  # not a multiple of 8: denoised at 40×48, resized back
    ident = _identity(tmp_path / "id.safetensors")
    out = tmp_path / "out.mp4"
    args = ["v2v", "--video", str(video), "--identity", str(ident), "--prompt", "a <v*> person", "--strength", "0.5",
            "--steps", "4", "--seed", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert str(out) in capsys.readouterr().out
    assert read_video(out).shape == (3, 44, 52, 3)
    rec = read_sidecar(out)
    assert rec["task"] == "v2v" and rec["strength"] == 0.5 and rec["seed"] == 2 and rec["input"]["frames"] == 3
    assert rec["models"]["identities"][0]["token"] == "<v*>"


def test_v2v_rounds_sizes_by_the_vae_scale_factor(tiny_pipe, tmp_path, monkeypatch):
    """The denoised size is the input's rounded down to the VAE's scale factor, read from the pipeline."""
    from importlib import import_module

    from magicme.models import ModelSpec

    v2v_module = import_module("magicme.v2v")  # `magicme.v2v` is the function
    seen = []
    monkeypatch.setattr(v2v_module, "partial_denoise_windows", lambda pipe, clips, *a, **k: seen.append(clips.shape) or clips)
    monkeypatch.setattr(tiny_pipe, "vae_scale_factor", 16)  # as a VAE with one more downsampling block would say
    video = write_video(_clip(2, 44, 52), tmp_path / "in")
    cfg = v2v_module.V2VConfig(prompt="a dog", steps=2, models=ModelSpec(base="tiny"))
    out = v2v_module.v2v(cfg, video, tmp_path / "o.gif", pipe=tiny_pipe, quiet=True)
    assert seen[0][2:4] == (32, 48) and read_video(out).shape == (2, 44, 52, 3)


def test_clip_fps_reads_the_record_then_the_file(tmp_path):
    from magicme.video import clip_fps

    mp4, gif = write_video(_clip(3), tmp_path / "a.mp4", fps=12), write_video(_clip(3), tmp_path / "b.gif", fps=10)
    assert clip_fps(mp4) == 12 and clip_fps(gif) == 10  # from the files: no run record beside them
    assert clip_fps(write_video(_clip(3), tmp_path / "frames", fps=12)) is None  # PNG frames say nothing
    assert clip_fps(write_video(_clip(3), tmp_path / "c.mp4", fps=12, record={"fps": 16})) == 16  # the record wins


def test_refined_clips_keep_the_input_frame_rate(tiny_pipe, tmp_path, monkeypatch):
    """Without --fps a V2V stage writes at its input's frame rate (a 16 fps Wan clip stays 16 fps); --fps wins."""
    from importlib import import_module

    from magicme.models import ModelSpec
    from magicme.video import clip_fps

    v2v_module = import_module("magicme.v2v")
    monkeypatch.setattr(v2v_module, "partial_denoise_windows", lambda pipe, clips, *a, **k: clips)
    video = write_video(_clip(2), tmp_path / "in.mp4", fps=16)
    cfg = v2v_module.V2VConfig(prompt="a dog", steps=2, models=ModelSpec(base="tiny"))
    out = v2v_module.v2v(cfg, video, tmp_path / "o.mp4", pipe=tiny_pipe, quiet=True)
    assert read_sidecar(out)["fps"] == 16 and read_sidecar(out)["config"]["fps"] == 16 and clip_fps(out) == 16
    out = v2v_module.v2v(v2v_module.V2VConfig(prompt="a dog", steps=2, fps=6, models=ModelSpec(base="tiny")),
                         video, tmp_path / "p.gif", pipe=tiny_pipe, quiet=True)
    assert read_sidecar(out)["fps"] == 6 and clip_fps(tmp_path / "p.gif") == 6
