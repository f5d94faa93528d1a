"""Test helper: write a diffusers MotionAdapter under AnimateDiff's original key names (mm_sd_v15*.ckpt).

The inverse of diffusers' `convert_animatediff_checkpoint_to_diffusers`, so tests can produce the files
users download from the AnimateDiff release themselves; the loading side is our `motion.py`.
"""

from __future__ import annotations

import re

import torch


def adapter_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MotionAdapter keys → `…motion_modules.N.temporal_transformer.…attention_blocks.K…` keys.

    The original keeps one positional table per attention block (`pos_encoder.pe`); diffusers keeps
    one per transformer block (`pos_embed.pe`).
    """
    out = {}
    for k, v in state.items():
        m = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", k)
        if m.endswith(".pos_embed.pe"):
            for j in (0, 1):
                out[m.replace(".pos_embed.pe", f".attention_blocks.{j}.pos_encoder.pe")] = v.clone()
            continue
        for a, b in ((".norm1.", ".norms.0."), (".norm2.", ".norms.1."), (".norm3.", ".ff_norm."),
                     (".attn1.", ".attention_blocks.0."), (".attn2.", ".attention_blocks.1.")):
            m = m.replace(a, b)
        out[m] = v
    return {k: v.contiguous() for k, v in out.items()}


def random_adapter(seed: int = 0, max_frames: int = 32, mid_block: bool = True):
    """A MotionAdapter shaped like SD-1.5's (8 heads, 32 norm groups) on the tiny preset's channels, every weight random.

    (A fresh adapter zero-initialises its output projections, which would make it an identity map.)
    """
    from diffusers import MotionAdapter

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = MotionAdapter(
            block_out_channels=(32, 64), motion_layers_per_block=1, motion_max_seq_length=max_frames,
            use_motion_mid_block=mid_block,
        )
        with torch.no_grad():
            for name, p in adapter.named_parameters():
                p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    return adapter.eval()
