"""ESRGAN / Real-ESRGAN super-resolution (RRDBNet), the first step of Tiled VCD (paper §4.3).

The network is the published RRDBNet: a conv, N residual-in-residual dense blocks, a conv, then
nearest-neighbour ×2 upsampling stages with convs. Real-ESRGAN's ×2 and ×1 models pixel-unshuffle the
input first (3·s² input channels), so every model keeps the same ×4 body. Released weight files use
one of three key layouts, all read here:

- Real-ESRGAN / BasicSR: `conv_first`, `body.N.rdb1.conv1`, `conv_body`, `conv_up1`, `conv_up2`, `conv_hr`, `conv_last`
- the ESRGAN repository's `RRDBNet_arch.py` (also BSRGAN and RealSR): `conv_first`, `RRDB_trunk.N.RDB1.conv1`,
  `trunk_conv`, `upconv1`, `upconv2`, `HRconv`, `conv_last`
- ESRGAN's first release (`*_old_arch.pth`): `model.0`, `model.1.sub.N.RDB1.conv1.0`, `model.1.sub.<last>`, then
  the remaining convs in order

Files load safely only: `.safetensors`, or pickles through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3×3 convs; the block's output is scaled by 0.2 and added to its input."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        for i in range(5):
            out = nf if i == 4 else gc
            self.add_module(f"conv{i + 1}", nn.Conv2d(nf + i * gc, out, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            feats.append(F.leaky_relu(getattr(self, f"conv{i}")(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks inside one more 0.2-scaled residual."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


@dataclass(frozen=True)
class RRDBConfig:
    """RRDBNet's shape, read off a state dict by `infer_config`."""

    in_ch: int = 3
    out_ch: int = 3
    nf: int = 64
    gc: int = 32
    num_blocks: int = 23
    num_upsample: int = 2  # ×2 stages after the body
    unshuffle: int = 1  # pixel-unshuffle factor applied to the input (Real-ESRGAN ×2: 2)

    @property
    def scale(self) -> int:
        return 2**self.num_upsample // self.unshuffle


class RRDBNet(nn.Module):
    """RRDBNet with Real-ESRGAN's module names, so its released state dicts load with strict=True."""

    def __init__(self, cfg: RRDBConfig = RRDBConfig()):
        super().__init__()
        self.cfg = cfg
        self.conv_first = nn.Conv2d(cfg.in_ch * cfg.unshuffle**2, cfg.nf, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(cfg.nf, cfg.gc) for _ in range(cfg.num_blocks)])
        self.conv_body = nn.Conv2d(cfg.nf, cfg.nf, 3, 1, 1)
        for i in range(cfg.num_upsample):
            self.add_module(f"conv_up{i + 1}", nn.Conv2d(cfg.nf, cfg.nf, 3, 1, 1))
        self.conv_hr = nn.Conv2d(cfg.nf, cfg.nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(cfg.nf, cfg.out_ch, 3, 1, 1)

    @property
    def scale(self) -> int:
        return self.cfg.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] → (B, 3, H·scale, W·scale), unclamped. H, W divisible by the unshuffle factor."""
        if self.cfg.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.cfg.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.cfg.num_upsample):
            feat = F.interpolate(feat, scale_factor=2, mode="nearest")
            feat = F.leaky_relu(getattr(self, f"conv_up{i + 1}")(feat), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


_OLD_RDB = re.compile(r"^model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_OLD_CONV = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_OLD_BODY_CONV = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")


def convert_esrgan_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-ESRGAN state dict (`model.0`, `model.1.sub.N.RDB1.conv1.0`, …) to RRDBNet's names.

    In that layout the top-level convs after the body (`model.3`, `model.6`, `model.8`, `model.10` for ×4)
    are, in index order, the upsampling convs, then the HR conv, then the last conv.
    """
    out: dict[str, torch.Tensor] = {}
    top: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if m := _OLD_RDB.match(key):
            block, rdb, conv, kind = m.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif m := _OLD_BODY_CONV.match(key):
            out[f"conv_body.{m.group(2)}"] = value
        elif m := _OLD_CONV.match(key):
            top.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            raise ValueError(f"unexpected key {key!r} for the original ESRGAN layout")
    indices = sorted(top)
    if len(indices) < 3 or indices[0] != 0:
        raise ValueError(f"original ESRGAN layout needs model.0 and at least two convs after the body, found model.{indices}")
    names = ["conv_first"] + [f"conv_up{i + 1}" for i in range(len(indices) - 3)] + ["conv_hr", "conv_last"]
    for name, idx in zip(names, indices):
        for kind, value in top[idx].items():
            out[f"{name}.{kind}"] = value
    return out


_ARCH_RDB = re.compile(r"^RRDB_trunk\.(\d+)\.RDB([123])\.conv([1-5])\.(weight|bias)$")
_ARCH_NAMES = {"conv_first": "conv_first", "trunk_conv": "conv_body", "upconv1": "conv_up1", "upconv2": "conv_up2",
               "HRconv": "conv_hr", "conv_last": "conv_last"}


def convert_rrdbnet_arch_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ESRGAN `RRDBNet_arch.py` state dict (`RRDB_trunk.N.RDB1.conv1`, `trunk_conv`, `upconv1`, `HRconv`;
    BSRGAN and RealSR use it too) to RRDBNet's names. The network is the same, module for module."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        module, _, kind = key.rpartition(".")
        if m := _ARCH_RDB.match(key):
            block, rdb, conv, kind = m.groups()
            out[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif module in _ARCH_NAMES and kind in ("weight", "bias"):
            out[f"{_ARCH_NAMES[module]}.{kind}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} for the ESRGAN RRDBNet_arch layout")
    return out


def to_rrdbnet_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in any of the three released layouts, in RRDBNet's (Real-ESRGAN's) names."""
    if any(k.startswith("model.") for k in sd):
        return convert_esrgan_keys(sd)
    if any(k.startswith(("RRDB_trunk.", "trunk_conv.")) for k in sd):
        return convert_rrdbnet_arch_keys(sd)
    return sd


def infer_config(sd: dict[str, torch.Tensor]) -> RRDBConfig:
    """RRDBNet's shape from a state dict in RRDBNet's names; ValueError when it is not one."""
    needed = ("conv_first.weight", "conv_body.weight", "conv_hr.weight", "conv_last.weight", "body.0.rdb1.conv1.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"not an RRDBNet state dict (missing {', '.join(missing)})")
    first = sd["conv_first.weight"]
    nf, in_total = first.shape[:2]
    out_ch = sd["conv_last.weight"].shape[0]
    unshuffle = {out_ch: 1, out_ch * 4: 2, out_ch * 16: 4}.get(in_total)
    if unshuffle is None:
        raise ValueError(f"conv_first takes {in_total} channels, which is not {out_ch}·s² for s in 1, 2, 4")
    num_blocks = len({k.split(".")[1] for k in sd if k.startswith("body.")})
    num_upsample = len({k.split(".")[0] for k in sd if re.match(r"^conv_up\d+\.", k)})
    gc = sd["body.0.rdb1.conv1.weight"].shape[0]
    return RRDBConfig(in_ch=out_ch, out_ch=out_ch, nf=nf, gc=gc, num_blocks=num_blocks, num_upsample=num_upsample, unshuffle=unshuffle)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file, loaded safely; Real-ESRGAN's `params_ema`/`params` wrappers are unpacked."""
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--upscaler {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"--upscaler {str(path)!r} is not a readable .safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"--upscaler {str(path)!r} is a pickle that needs more than tensors to load; refused (safe loading only: "
            f"convert it to .safetensors from a trusted source). {first}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"--upscaler {str(path)!r} is not a readable weight file ({e})") from None
    if isinstance(obj, dict):
        for wrapper in ("params_ema", "params", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"--upscaler {str(path)!r} does not hold a state dict of tensors")
    return obj


def load_rrdbnet(path: str | Path) -> RRDBNet:
    """An ESRGAN/Real-ESRGAN RRDBNet from a released `.pth`/`.safetensors` file (either key layout), in eval mode."""
    sd = read_state_dict(path)
    try:
        sd = to_rrdbnet_keys(sd)
        cfg = infer_config(sd)
        model = RRDBNet(cfg)
        model.load_state_dict(sd, strict=True)
    except (ValueError, RuntimeError) as e:
        keys = ", ".join(list(sd)[:4])
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"--upscaler {str(path)!r}: unknown architecture, expected an ESRGAN/Real-ESRGAN RRDBNet "
            f"(keys like conv_first.weight, RRDB_trunk.0.RDB1.conv1.weight or model.0.weight; found {keys}, …): {first}"
        ) from None
    return model.eval()


@torch.no_grad()
def esrgan_upscale(model: RRDBNet, frames: torch.Tensor, tile: int = 256, pad: int = 16) -> torch.Tensor:
    """Upscale (N, 3, H, W) frames in [0, 1], one frame and one `tile`-px input tile at a time; clamped to [0, 1].

    Each tile is run with `pad` px of its neighbours around it and only its own part kept, so memory is
    bounded by one tile (a ×4 2048² output would need GBs at once); tiles cut inside the network's
    receptive field differ from a whole-frame run only near their edges, by little. Sides not divisible
    by the model's pixel-unshuffle factor are padded at the bottom/right by reflection, as Real-ESRGAN's
    `RealESRGANer.pre_process` does, and the pad cropped off.
    """
    p, s = model.cfg.unshuffle, model.scale
    out = []
    for frame in frames:
        x = frame[None]
        h, w = x.shape[-2:]
        ph, pw = (-h) % p, (-w) % p
        if ph or pw:  # reflect needs a side longer than its pad; a 1-2 px side repeats its edge instead
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h - ph, w - pw) > 0 else "replicate")
        hp, wp = x.shape[-2:]
        y = torch.empty(1, 3, hp * s, wp * s, dtype=x.dtype, device=x.device)
        step = max(p, tile // p * p)
        margin = -(-pad // p) * p  # a multiple of the unshuffle factor keeps tiles aligned
        for top in range(0, hp, step):
            for left in range(0, wp, step):
                t0, l0 = max(top - margin, 0), max(left - margin, 0)
                t1, l1 = min(top + step + margin, hp), min(left + step + margin, wp)
                part = model(x[..., t0:t1, l0:l1])
                bottom, right = min(top + step, hp), min(left + step, wp)
                y[..., top * s : bottom * s, left * s : right * s] = part[
                    ..., (top - t0) * s : (bottom - t0) * s, (left - l0) * s : (right - l0) * s
                ]
        out.append(y[..., : h * s, : w * s].clamp(0, 1))
    return torch.cat(out)
