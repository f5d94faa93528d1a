import pytest
import torch
from safetensors.torch import save_file

from magicme.esrgan import RRDBConfig, RRDBNet, esrgan_upscale, load_rrdbnet

SMALL = dict(nf=8, gc=4, num_blocks=2)


def _random_net(num_upsample: int, unshuffle: int, seed: int = 0) -> RRDBNet:
    torch.manual_seed(seed)
    net = RRDBNet(RRDBConfig(num_upsample=num_upsample, unshuffle=unshuffle, **SMALL)).eval()
    for p in net.parameters():  # make the 0.2-scaled residuals matter
        torch.nn.init.normal_(p, std=0.1)
    return net


def _esrgan_layout(net: RRDBNet) -> dict[str, torch.Tensor]:
    """The original ESRGAN release layout (RRDB_ESRGAN_x4.pth): model.0, model.1.sub.N.RDBk.convj.0, model.3 …"""
    sd = net.state_dict()
    out = {}
    n = net.cfg.num_blocks
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "body":  # body.i.rdbk.convj.weight
            out[f"model.1.sub.{parts[1]}.RDB{parts[2][-1]}.{parts[3]}.0.{parts[4]}"] = value
    # the sequential: 0 conv, 1 shortcut(body + LR conv), then per ×2 stage [upsample, conv, lrelu], HR conv, lrelu, last
    top = {"conv_first": 0}
    idx = 3
    for i in range(net.cfg.num_upsample):
        top[f"conv_up{i + 1}"] = idx
        idx += 3
    top["conv_hr"] = idx - 1
    top["conv_last"] = idx + 1
    for kind in ("weight", "bias"):
        out[f"model.1.sub.{n}.{kind}"] = sd[f"conv_body.{kind}"]
        for name, i in top.items():
            out[f"model.{i}.{kind}"] = sd[f"{name}.{kind}"]
    return out


_ARCH_NAMES = {"conv_first": "conv_first", "conv_body": "trunk_conv", "conv_up1": "upconv1", "conv_up2": "upconv2",
               "conv_hr": "HRconv", "conv_last": "conv_last"}


def _rrdbnet_arch_layout(net: RRDBNet) -> dict[str, torch.Tensor]:
    """The ESRGAN repository's RRDBNet_arch.py layout (RRDB_ESRGAN_x4.pth; BSRGAN, RealSR):
    conv_first, RRDB_trunk.N.RDBk.convj, trunk_conv, upconv1, upconv2, HRconv, conv_last."""
    out = {}
    for key, value in net.state_dict().items():
        parts = key.split(".")
        if parts[0] == "body":  # body.i.rdbk.convj.weight
            out[f"RRDB_trunk.{parts[1]}.RDB{parts[2][-1]}.{parts[3]}.{parts[4]}"] = value
        else:
            out[f"{_ARCH_NAMES[parts[0]]}.{parts[1]}"] = value
    return out


def test_esrgan_x4_layout_indices_match_the_release():
    keys = set(_esrgan_layout(_random_net(2, 1)))
    assert {"model.0.weight", "model.3.weight", "model.6.weight", "model.8.weight", "model.10.weight"} <= keys
    assert "model.1.sub.0.RDB1.conv1.0.weight" in keys and "model.1.sub.2.weight" in keys


@pytest.mark.parametrize(
    "num_upsample, unshuffle, scale", [(2, 1, 4), (2, 2, 2)], ids=["x4", "x2-pixel-unshuffle"]
)
@pytest.mark.parametrize("layout", ["realesrgan-pth", "esrgan-pth", "esrgan-arch-pth", "safetensors"])
def test_loader_reads_released_layouts(tmp_path, num_upsample, unshuffle, scale, layout):
    net = _random_net(num_upsample, unshuffle)
    x = torch.rand(1, 3, 12, 10)
    expected = net(x)
    assert expected.shape == (1, 3, 12 * scale, 10 * scale)
    if layout == "realesrgan-pth":
        path = tmp_path / "RealESRGAN.pth"
        torch.save({"params_ema": net.state_dict()}, path)  # how Real-ESRGAN releases its weights
    elif layout == "esrgan-pth":
        path = tmp_path / "ESRGAN.pth"
        torch.save(_esrgan_layout(net), path)
    elif layout == "esrgan-arch-pth":
        path = tmp_path / "BSRGAN.pth"
        sd = _rrdbnet_arch_layout(net)
        assert {"RRDB_trunk.0.RDB1.conv1.weight", "trunk_conv.weight", "upconv1.weight", "HRconv.weight"} <= set(sd)
        torch.save(sd, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    loaded = load_rrdbnet(path)
    assert loaded.scale == scale and loaded.cfg.num_blocks == 2 and loaded.cfg.nf == 8 and loaded.cfg.gc == 4
    assert torch.equal(loaded(x), expected)


def test_esrgan_x2_old_layout_with_one_upsample(tmp_path):
    net = _random_net(1, 1)
    torch.save(_esrgan_layout(net), tmp_path / "x2.pth")
    loaded = load_rrdbnet(tmp_path / "x2.pth")
    x = torch.rand(1, 3, 8, 8)
    assert loaded.scale == 2 and torch.equal(loaded(x), net(x))


@pytest.mark.parametrize("unshuffle", [1, 2])
def test_tiled_upscale_matches_the_whole_frame(unshuffle):
    """With a pad wider than the receptive field of this one-block net, tiling changes nothing."""
    torch.manual_seed(0)
    net = RRDBNet(RRDBConfig(nf=8, gc=4, num_blocks=1, num_upsample=2, unshuffle=unshuffle)).eval()
    x = torch.rand(1, 3, 50, 38)
    whole = esrgan_upscale(net, x, tile=1000)
    tiled = esrgan_upscale(net, x, tile=16, pad=24)
    assert tiled.shape == whole.shape == (1, 3, 50 * net.scale, 38 * net.scale)
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    assert not torch.allclose(esrgan_upscale(net, x, tile=16, pad=0), whole, atol=1e-3)  # the pad is what makes it exact


def test_upscale_pads_odd_sizes_for_pixel_unshuffle():
    net = _random_net(2, 2)
    out = esrgan_upscale(net, torch.rand(2, 3, 7, 9))
    assert out.shape == (2, 3, 14, 18) and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("unshuffle, size", [(2, (7, 9)), (4, (13, 6)), (2, (1, 5))])
def test_odd_sizes_are_reflect_padded_like_realesrganer(unshuffle, size):
    """RealESRGANer.pre_process pads the bottom/right to a multiple of the unshuffle factor with
    F.pad(…, 'reflect') and crops the output; a side too short to reflect repeats its edge."""
    torch.manual_seed(0)
    net = RRDBNet(RRDBConfig(nf=8, gc=4, num_blocks=1, num_upsample=2, unshuffle=unshuffle)).eval()
    h, w = size
    x = torch.rand(1, 3, h, w)
    ph, pw = -h % unshuffle, -w % unshuffle
    mode = "reflect" if ph < h and pw < w else "replicate"
    with torch.no_grad():
        expected = net(torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode))[..., : h * net.scale, : w * net.scale]
    torch.testing.assert_close(esrgan_upscale(net, x, tile=1000), expected.clamp(0, 1), atol=1e-6, rtol=0)


class _Payload:
    pass


def test_unsafe_pickle_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv_first.weight": torch.zeros(1), "extra": _Payload()}, path)  # needs code to unpickle
    with pytest.raises(ValueError, match="refused"):
        load_rrdbnet(path)


def test_unknown_architecture_is_a_clear_error(tmp_path):
    # SRVGGNetCompact-like keys (realesr-general-x4v3): not an RRDBNet
    torch.save({"body.0.weight": torch.zeros(8, 3, 3, 3), "body.0.bias": torch.zeros(8)}, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="unknown architecture"):
        load_rrdbnet(tmp_path / "vgg.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a weight file")
    with pytest.raises(ValueError, match="--upscaler"):
        load_rrdbnet(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="--upscaler"):
        load_rrdbnet(tmp_path / "missing.pth")
