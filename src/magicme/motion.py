"""AnimateDiff motion modules and motion LoRAs from single files, in the original or the diffusers layout.

The original AnimateDiff release (`mm_sd_v15.ckpt` v1, `mm_sd_v15_v2.ckpt` v2, `v3_sd15_mm.ckpt` v3),
AnimateLCM's `AnimateLCM_sd15_t2v.ckpt` and AnimateDiff-Lightning's ComfyUI files name their tensors
`…motion_modules.N.temporal_transformer.…attention_blocks.0…`; diffusers' `MotionAdapter` names them
`…motion_modules.N.…attn1…`. Keys are renamed with diffusers' own converter, and the adapter's config
(channels, layers, mid block, maximum frames) is read from the tensors' names and shapes, so no config
has to come from the hub.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .weights import describe, read_weights, tensors

_BLOCK = re.compile(r"(down_blocks|mid_block|up_blocks)\.")


def motion_layout(keys) -> str | None:
    """'original' (AnimateDiff's own names), 'diffusers' (MotionAdapter's), or None: not a motion module."""
    keys = list(keys)
    if not any(".motion_modules." in k or k.startswith("motion_modules.") for k in keys) or any("lora" in k for k in keys):
        return None
    return "original" if any(".temporal_transformer." in k for k in keys) else "diffusers"


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrappers some tools put before the block names ('module.', 'diffusion_model.', 'unet.' …)."""
    out = {}
    for k, v in state.items():
        m = _BLOCK.search(k)
        out[k[m.start():] if m else k] = v
    return out


def to_diffusers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int | None]:
    """Original-layout motion weights → MotionAdapter names, and the frame count of their positional encoding."""
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    pe = next((v for k, v in state.items() if k.endswith("pos_encoder.pe")), None)
    return convert_animatediff_checkpoint_to_diffusers(state), (int(pe.shape[1]) if pe is not None else None)


def adapter_config(state: dict[str, torch.Tensor], max_frames: int | None = None) -> dict:
    """MotionAdapter's config read off diffusers-layout weights (heads and norm groups: SD-1.5's 8 and 32)."""
    downs = sorted({int(m[1]) for k in state if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    if not downs:
        raise ValueError("no down-block motion modules")
    channels = [int(state[f"down_blocks.{i}.motion_modules.0.proj_in.weight"].shape[0]) for i in downs]
    layers = {int(m[1]) for k in state if (m := re.match(r"down_blocks\.0\.motion_modules\.(\d+)\.", k))}
    blocks = {int(m[1]) for k in state if (m := re.match(r"down_blocks\.0\.motion_modules\.0\.transformer_blocks\.(\d+)\.", k))}
    pe = next((v for k, v in state.items() if k.endswith("pos_embed.pe")), None)
    config = dict(
        block_out_channels=tuple(channels),
        motion_layers_per_block=len(layers),
        motion_transformer_layers_per_block=len(blocks),
        use_motion_mid_block=any(k.startswith("mid_block.") for k in state),
        motion_max_seq_length=max_frames or (int(pe.shape[1]) if pe is not None else 32),
    )
    if "conv_in.weight" in state:
        config["conv_in_channels"] = int(state["conv_in.weight"].shape[1])
    return config


def load_motion_file(path: str | Path, config_file: Path | None = None):
    """A MotionAdapter from one .ckpt/.safetensors file in either layout (config.json beside it wins)."""
    from diffusers import MotionAdapter

    raw = tensors(read_weights(path, "--motion-adapter"))
    layout = motion_layout(raw)
    if layout is None:
        raise ValueError(f"--motion-adapter {str(path)!r} is not a motion module: it holds {describe(list(raw))}")
    state = strip_prefix(raw)
    max_frames = None
    if layout == "original":
        state, max_frames = to_diffusers(state)
    try:
        config = adapter_config(state, max_frames)
    except (ValueError, KeyError) as e:
        raise ValueError(f"--motion-adapter {str(path)!r}: cannot read its layout ({e})") from None
    if config_file is not None and config_file.is_file():
        config = MotionAdapter.load_config(str(config_file))
    adapter = MotionAdapter.from_config(config)
    missing, unexpected = adapter.load_state_dict(state, strict=False)
    # the sinusoidal positional tables are recomputed by the model; anything else missing is a wrong file
    missing = [k for k in missing if not k.endswith("pos_embed.pe")]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        what = "lacks" if missing else "has an unexpected"
        raise ValueError(f"--motion-adapter {str(path)!r} does not fit an AnimateDiff motion adapter: it {what} {first!r}")
    return adapter.eval()


def check_adapter_fits(adapter, unet, name: str) -> None:
    """The adapter's blocks must match the base UNet's (an SDXL motion module on SD-1.5 is refused here)."""
    want, got = tuple(unet.config.block_out_channels), tuple(adapter.config.block_out_channels)
    if want != got:
        raise ValueError(
            f"--motion-adapter {name!r} is for a UNet with channels {got}, the base model's are {want} "
            "(an SDXL motion module on an SD-1.5 model?)"
        )


def motion_lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A motion LoRA (AnimateDiff's `v2_lora_*.ckpt` or diffusers' hub layout) as diffusers LoRA keys under 'unet.'."""
    state = {k.removeprefix("unet."): v for k, v in state.items()}
    if any(".temporal_transformer." in k for k in state):
        state, _ = to_diffusers(strip_prefix(state))
    return {f"unet.{k}": v for k, v in state.items()}
