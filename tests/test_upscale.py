import math

import numpy as np
import pytest
import torch

from magicme.cli import main
from magicme.esrgan import RRDBConfig, RRDBNet, load_rrdbnet
from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec
from magicme.upscale import (
    UpscaleConfig,
    blend_weights,
    ramp_window,
    tile_grid,
    tile_seeds,
    tile_span,
    tiled_map,
    tiled_vcd,
    tiny_controlnet,
    upscale_frames,
)
from magicme.v2v import partial_denoise, video_pipeline
from magicme.video import read_sidecar, read_video, write_video


@pytest.mark.parametrize(
    "length, tile, overlap", [(64, 64, 8), (128, 64, 8), (130, 64, 16), (1024, 512, 64), (1000, 512, 0), (1536, 512, 64),
                              (520, 512, 64), (96, 64, 56)])
def test_tiles_are_fewest_and_cover_every_pixel_with_the_overlap(length, tile, overlap):
    side, starts = tile_span(length, tile, overlap)
    assert side % 8 == 0 and side <= length and starts[0] == 0 and starts[-1] == length - side
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + side] = True
    assert covered.all()
    assert all(a + side - b >= overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap px
    assert len(starts) == math.ceil(length / tile)  # no more tiles than tiles of `tile` px with no overlap need
    assert side < tile + overlap + 8  # grown by less than the overlap (and the rounding to 8)


def test_a_1024_frame_is_four_tiles_of_544_not_nine_of_512():
    assert tile_span(1024, 512, 64) == (544, [0, 480])
    (th, tw), grid = tile_grid(1024, 1024, 512, 64)
    assert (th, tw) == (544, 544) and grid == [(0, 0), (0, 480), (480, 0), (480, 480)]
    (th, tw), grid = tile_grid(768, 1024, 512, 64)  # frames need not be square; neither need the tiles
    assert (th, tw) == (416, 544) and len(grid) == 4


@pytest.mark.parametrize("h, w, tile, overlap", [(128, 128, 64, 8), (136, 200, 64, 16), (64, 96, 64, 0)])
def test_blend_weights_sum_to_one_and_are_positive(h, w, tile, overlap):
    grid, window, total = blend_weights(h, w, tile, overlap)
    th, tw = window.shape
    assert window.min() > 0 and total.min() > 0
    weight_sum = np.zeros((h, w))
    for y, x in grid:
        weight_sum[y : y + th, x : x + tw] += window / total[y : y + th, x : x + tw]
    np.testing.assert_allclose(weight_sum, 1.0, atol=1e-12)


def test_ramp_window_is_symmetric_and_flat_inside():
    w = ramp_window(64, 16)
    np.testing.assert_allclose(w, w[::-1])
    assert (w[16:48] == 1).all() and np.all(np.diff(w[:16]) > 0)
    ramp = w[:16]
    np.testing.assert_allclose(ramp + ramp[::-1], 1.0)  # sin² + cos²: overlapping ramps already sum to one


@pytest.mark.parametrize("batch", [1, 3])
def test_tile_then_merge_with_identity_reproduces_the_frame(batch):
    rng = np.random.default_rng(0)
    frames = rng.random((3, 136, 200, 3), dtype=np.float32)
    seen = []

    def identity(clips):
        seen.append(len(clips))
        return clips

    out = tiled_map(frames, identity, tile=64, overlap=16, batch=batch)
    np.testing.assert_allclose(out, frames, atol=1e-6)
    q = lambda a: (a * 255).round().astype(np.uint8)  # noqa: E731 - what write_video stores
    assert np.array_equal(q(out), q(frames))
    assert sum(seen) == len(tile_grid(136, 200, 64, 16)[1]) and max(seen) <= batch


def test_merge_places_each_tile_where_it_came_from():
    frames = np.zeros((1, 128, 128, 3), np.float32)

    def mark(clips):  # each tile is filled with its own top-left value plus one
        return np.ones_like(clips) * (clips[:, :, :1, :1] + 1)

    out = tiled_map(frames, mark, tile=64, overlap=16, batch=2)
    np.testing.assert_allclose(out, 1.0, atol=1e-6)


def test_tile_seeds_do_not_depend_on_batching():
    assert tile_seeds(7, 0, 4) == tile_seeds(7, 0, 2) + tile_seeds(7, 2, 2)
    assert len(set(tile_seeds(7, 0, 16))) == 16 and tile_seeds(7, 0, 2) != tile_seeds(8, 0, 2)


def test_upscale_frames_lanczos_and_esrgan(tmp_path, caplog):
    frames = np.random.default_rng(1).random((2, 16, 12, 3), dtype=np.float32)
    with caplog.at_level("WARNING"):
        lanczos = upscale_frames(frames, 2)
    assert lanczos.shape == (2, 32, 24, 3) and "Lanczos" in caplog.text
    torch.manual_seed(0)
    net = RRDBNet(RRDBConfig(nf=8, gc=4, num_blocks=1, num_upsample=2, unshuffle=1))
    torch.save({"params_ema": net.state_dict()}, tmp_path / "x4.pth")
    x2_from_x4 = upscale_frames(frames, 2, load_rrdbnet(tmp_path / "x4.pth"))
    assert x2_from_x4.shape == (2, 32, 24, 3) and 0 <= x2_from_x4.min() and x2_from_x4.max() <= 1


def test_batched_tiles_match_one_at_a_time(tiny_pipe):
    """A tile's result does not depend on the batch it is in (own seed, own ControlNet condition)."""
    pipe = video_pipeline(tiny_pipe, tiny_controlnet())
    clips = np.random.default_rng(2).random((3, 2, 64, 64, 3), dtype=np.float32)
    kw = dict(strength=0.5, steps=4, gamma=0.15, controlnet_scale=1.0)
    seeds = tile_seeds(0, 0, 3)
    batched = partial_denoise(pipe, clips, "a dog", seeds=seeds, **kw)
    single = np.concatenate([partial_denoise(pipe, clips[i : i + 1], "a dog", seeds=seeds[i : i + 1], **kw) for i in range(3)])
    np.testing.assert_allclose(batched, single, atol=1e-4)
    # the ControlNet is live: conditioning changes the result
    off = partial_denoise(pipe, clips[:1], "a dog", seeds=seeds[:1], **{**kw, "controlnet_scale": 0.0})
    assert np.abs(off - single[:1]).max() > 1e-3


def _identity_file(path):
    return save_identity(path, torch.randn(2, 32), IdentityInfo(token="<v*>", class_word="person", num_vectors=2, hidden_size=32))


def test_tiled_vcd_end_to_end_with_saved_controlnet(tmp_path):
    video = write_video(np.random.default_rng(3).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8), tmp_path / "in.gif")
    ident = _identity_file(tmp_path / "id.safetensors")
    tiny_controlnet().save_pretrained(tmp_path / "controlnet")
    cfg = UpscaleConfig(
        prompt="a <v*> person", identities=[str(ident)], controlnet=str(tmp_path / "controlnet"), steps=5,
        tile_batch=2, models=ModelSpec(base="tiny"),
    )
    out = tiled_vcd(cfg, video, tmp_path / "up.gif", quiet=True, device="cpu")
    assert read_video(out).shape == (3, 96, 80, 3)
    rec = read_sidecar(out)
    assert rec["task"] == "upscale" and rec["tile"] == 64 and rec["overlap"] == 8 and rec["tiles"] == 4
    assert rec["tile_size"] == [56, 48]  # 96×80 in 2×2 tiles sharing ≥ 8 px
    assert rec["strength"] == 0.2 and rec["models"]["identities"][0]["token"] == "<v*>"
    assert rec["controlnet_model"]["source"] == "local" and rec["upscaler_model"] == "lanczos"


def test_tile_clips_longer_than_the_context_run_in_windows_with_the_controlnet(tmp_path, tiny_pipe):
    video = write_video(np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), tmp_path / "in.gif")
    cfg = UpscaleConfig(prompt="a dog", steps=5, context=4, models=ModelSpec(base="tiny"))
    out = tiled_vcd(cfg, video, tmp_path / "up.gif", pipe=tiny_pipe, quiet=True)
    assert read_video(out).shape == (6, 64, 64, 3) and read_sidecar(out)["context"] == 4
    stock = {type(m).__name__ for m in tiny_pipe.unet.modules()}  # the shared UNet is stock again afterwards
    assert not stock & {"FreeNoiseTransformerBlock", "SplitInferenceModule"}


def test_tiled_vcd_without_controlnet(tmp_path, tiny_pipe, monkeypatch):
    """--controlnet none: the tiles are partially denoised by the plain video-to-video pipeline."""
    from importlib import import_module

    upscale_module = import_module("magicme.upscale")
    pipes = []
    real = upscale_module.partial_denoise_windows
    monkeypatch.setattr(upscale_module, "partial_denoise_windows", lambda pipe, *a, **k: pipes.append(pipe) or real(pipe, *a, **k))
    monkeypatch.setattr(upscale_module, "load_controlnet", lambda *a, **k: pytest.fail("no ControlNet is loaded"))
    video = write_video(np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), tmp_path / "in.gif")
    cfg = UpscaleConfig(prompt="a dog", controlnet="none", steps=5, models=ModelSpec(base="tiny"))
    out = tiled_vcd(cfg, video, tmp_path / "up.gif", pipe=tiny_pipe, quiet=True)
    assert read_video(out).shape == (2, 64, 64, 3) and read_sidecar(out)["controlnet_model"] is None
    assert pipes and all(type(p).__name__ == "AnimateDiffVideoToVideoPipeline" for p in pipes)


def test_missing_default_controlnet_is_named_before_the_base_model_loads(tmp_path, tiny_model_dir, monkeypatch):
    """Offline, the default ControlNet Tile is not there: one error naming --controlnet (and `none`), and the
    base model is never loaded; a malformed --controlnet is refused by the config check itself."""
    from importlib import import_module

    from magicme.models import ModelNotFoundError

    upscale_module = import_module("magicme.upscale")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(upscale_module, "load_stage_pipeline", lambda *a, **k: pytest.fail("the base model was loaded"))
    video = write_video(np.zeros((2, 48, 40, 3), np.uint8), tmp_path / "in.gif")
    cfg = UpscaleConfig(prompt="a dog", steps=5, tile=64, models=ModelSpec(base=str(tiny_model_dir)))
    with pytest.raises(ModelNotFoundError, match="--controlnet 'lllyasviel/control_v11f1e_sd15_tile'.*--controlnet none") as e:
        tiled_vcd(cfg, video, tmp_path / "up.gif", quiet=True, device="cpu")
    assert "motion adapter" not in str(e.value).lower() and "MotionAdapter" not in str(e.value)
    with pytest.raises(ModelNotFoundError, match="--controlnet"):
        UpscaleConfig(prompt="a dog", controlnet=str(tmp_path / "missing"), models=ModelSpec(base=str(tiny_model_dir))).check()
    assert not (tmp_path / "up.gif").exists()


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(strength=0.0), "--strength"),
        (dict(strength=1.5), "--strength"),
        (dict(tile=60), "--tile"),
        (dict(tile=256), "larger than the upscaled frame"),
        (dict(scale=3), "--scale"),
        (dict(overlap=64), "--overlap"),
        (dict(upscaler="missing.pth"), "--upscaler"),
    ],
)
def test_bad_settings_fail_before_work(tmp_path, change, needle):
    video = write_video(np.zeros((2, 48, 40, 3), np.uint8), tmp_path / "in.gif")
    cfg = UpscaleConfig(prompt="a dog", steps=5, **change)
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        tiled_vcd(cfg, video, tmp_path / "up.gif", quiet=True, device="cpu")
    assert not (tmp_path / "up.gif").exists()


def _esrgan_x2_file(path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = RRDBNet(RRDBConfig(nf=8, gc=4, num_blocks=1, num_upsample=2, unshuffle=2))  # Real-ESRGAN x2plus shape
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


def test_upscale_cli_end_to_end(tmp_path, capsys):
    video = write_video(np.random.default_rng(4).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8), tmp_path / "in.gif")
    ident = _identity_file(tmp_path / "id.safetensors")
    upscaler = _esrgan_x2_file(tmp_path / "RealESRGAN_x2plus.safetensors")
    out = tmp_path / "up.mp4"
    code = main(["upscale", "--video", str(video), "--identity", str(ident), "--prompt", "a <v*> person", "--scale", "2",
                 "--upscaler", str(upscaler), "--tile", "48", "--overlap", "16", "--steps", "5", "--out", str(out), "--quiet"])
    assert code == 0 and str(out) in capsys.readouterr().out
    assert read_video(out).shape == (2, 80, 96, 3)
    rec = read_sidecar(out)
    assert rec["tiles"] == 4 and rec["tile_size"] == [48, 56]  # 80×96 at tile 48, overlap 16: 2×2, not 2×3
    assert rec["upscaler_model"]["source"] == "local" and rec["scale"] == 2


class _Payload:
    pass


@pytest.mark.parametrize("kind, needle", [("pickle", "refused"), ("unknown", "unknown architecture"), ("tile", "--tile")])
def test_upscale_cli_bad_input(tmp_path, capsys, kind, needle):
    video = write_video(np.zeros((2, 40, 48, 3), np.uint8), tmp_path / "in.gif")
    args = ["upscale", "--video", str(video), "--prompt", "a dog", "--steps", "5", "--out", str(tmp_path / "up.gif")]
    if kind == "pickle":
        torch.save({"conv_first.weight": torch.zeros(1), "x": _Payload()}, tmp_path / "evil.pth")
        args += ["--upscaler", str(tmp_path / "evil.pth")]
    elif kind == "unknown":
        torch.save({"body.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "vgg.pth")
        args += ["--upscaler", str(tmp_path / "vgg.pth")]
    else:
        args += ["--tile", "44"]
    before = set(tmp_path.iterdir())
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert set(tmp_path.iterdir()) == before
