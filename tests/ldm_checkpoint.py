"""Test helper: write a diffusers SD pipeline as one original-layout (LDM) checkpoint, the Civitai form.

Only what the tests need to produce such a file themselves; the loading side is diffusers' own
single-file converter, which our `models.load_base` calls.
"""

from __future__ import annotations

import re

import torch


def _resnet(key: str) -> str:
    for a, b in (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                 ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")):
        key = key.replace(f".{a}.", f".{b}.")
    return key


def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int, attn_down: list[bool], attn_up: list[bool]) -> dict:
    """diffusers UNet2DConditionModel state dict → `model.diffusion_model.*` keys."""
    n = layers_per_block
    out = {}
    for k, v in sd.items():
        m = k
        m = m.replace("time_embedding.linear_1", "time_embed.0").replace("time_embedding.linear_2", "time_embed.2")
        m = m.replace("conv_in.", "input_blocks.0.0.").replace("conv_norm_out.", "out.0.").replace("conv_out.", "out.2.")
        if r := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", m):
            i, kind, j, rest = int(r[1]), r[2], int(r[3]), r[4]
            m = f"input_blocks.{(n + 1) * i + j + 1}.{0 if kind == 'resnets' else 1}.{rest}"
        elif r := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", m):
            m = f"input_blocks.{(n + 1) * (int(r[1]) + 1)}.0.op.{r[2]}"
        elif r := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", m):
            m = f"middle_block.{1 if r[1] == 'attentions' else 2 * int(r[2])}.{r[3]}"
        elif r := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", m):
            i, kind, j, rest = int(r[1]), r[2], int(r[3]), r[4]
            m = f"output_blocks.{(n + 1) * i + j}.{0 if kind == 'resnets' else 1}.{rest}"
        elif r := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", m):
            i = int(r[1])
            m = f"output_blocks.{(n + 1) * i + n}.{2 if attn_up[i] else 1}.conv.{r[2]}"
        if "resnets" in k:
            m = _resnet("." + m)[1:]
        out["model.diffusion_model." + m] = v
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], num_blocks: int) -> dict:
    """diffusers AutoencoderKL state dict → `first_stage_model.*` keys (attention as 1×1 convs)."""
    out = {}
    for k, v in sd.items():
        m = k
        m = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", m)
        m = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", m)
        m = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda r: f"decoder.up.{num_blocks - 1 - int(r[1])}.block.{r[2]}", m)
        m = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                   lambda r: f"decoder.up.{num_blocks - 1 - int(r[1])}.upsample", m)
        m = m.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        m = m.replace("mid_block.attentions.0", "mid.attn_1")
        m = m.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if "mid.attn_1" in m:
            for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                m = m.replace(f".{a}.", f".{b}.")
            if v.ndim == 2:
                v = v[:, :, None, None]
        out["first_stage_model." + m] = v
    return out


def pipeline_to_ldm(pipe) -> dict[str, torch.Tensor]:
    unet = pipe.unet
    cfg = unet.config
    attn_down = ["CrossAttn" in t for t in cfg.down_block_types]
    attn_up = ["CrossAttn" in t for t in cfg.up_block_types]
    state = unet_to_ldm(unet.state_dict(), cfg.layers_per_block, attn_down, attn_up)
    state |= vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))
    # original checkpoints keep transformers 4's `text_model.` level, which transformers 5 dropped
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in pipe.text_encoder.state_dict().items()}
    state |= {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    return {k: v.contiguous() for k, v in state.items()}
