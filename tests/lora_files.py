"""Test helper: random LoRAs for the tiny preset in the layouts users have, and the merged weights they mean.

A LoRA adds scale · (alpha / rank) · up @ down to each targeted weight (Hu et al. 2021; kohya's `alpha`
key, AnimateDiff's motion LoRAs without one). Tests compare a pipeline given the file with a pipeline whose
weights were merged by `merge` — the published definition, independent of diffusers and peft.
"""

from __future__ import annotations

import torch

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def random_lora(unet, text_encoder, rank: int = 2, alpha: float = 1.0, seed: int = 0, std: float = 0.3) -> dict:
    """{("unet"|"text_encoder", module name): (down (r, in), up (out, r), alpha)} over the spatial layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for part, model, targets in (("unet", unet, UNET_TARGETS), ("text_encoder", text_encoder, TEXT_TARGETS)):
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(targets) and "motion_modules" not in name:
                down = torch.randn(rank, m.in_features, generator=g) * std
                up = torch.randn(m.out_features, rank, generator=g) * std
                out[(part, name)] = (down, up, alpha)
    return out


def kohya_layout(lora: dict) -> dict[str, torch.Tensor]:
    """kohya-ss / A1111: `lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`."""
    sd = {}
    for (part, name), (down, up, alpha) in lora.items():
        prefix = "lora_unet_" if part == "unet" else "lora_te_text_model_"
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down.contiguous()
        sd[f"{key}.lora_up.weight"] = up.contiguous()
        sd[f"{key}.alpha"] = torch.tensor(float(alpha) * down.shape[0])  # kohya's alpha: scale × rank
    return sd


def diffusers_layout(lora: dict) -> dict[str, torch.Tensor]:
    """diffusers/peft (`save_lora_weights`): `unet.<module>.lora_A.weight` / `lora_B.weight`; the text encoder
    under transformers 4's `text_encoder.text_model.` names, as files in the wild have them. No alphas: scale 1."""
    sd = {}
    for (part, name), (down, up, alpha) in lora.items():
        assert alpha == 1.0, "the diffusers layout carries no alpha"
        key = f"unet.{name}" if part == "unet" else f"text_encoder.text_model.{name}"
        sd[f"{key}.lora_A.weight"] = down.contiguous()
        sd[f"{key}.lora_B.weight"] = up.contiguous()
    return sd


def merge(pipe, lora: dict, scale: float = 1.0) -> None:
    """W ← W + scale · alpha · up @ down for every layer of `lora`, in place (the reference)."""
    from magicme.speed import unfuse_attention

    unfuse_attention(pipe.unet)  # the separate q/k/v layers the LoRA names (bit-exact split of the fused ones)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    with torch.no_grad():
        for (part, name), (down, up, alpha) in lora.items():
            layer = dict(models[part].named_modules())[name]
            layer.weight += scale * alpha * (up @ down).to(layer.weight.dtype)


def random_motion_lora(unet, rank: int = 2, seed: int = 1, std: float = 0.3) -> dict:
    """{("unet", module name): (down, up, 1.0)} over the motion modules' attention projections."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in unet.named_modules():
        if "motion_modules" in name and isinstance(m, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            out[("unet", name)] = (torch.randn(rank, m.in_features, generator=g) * std,
                                   torch.randn(m.out_features, rank, generator=g) * std, 1.0)
    return out


def animatediff_motion_lora_layout(lora: dict) -> dict[str, torch.Tensor]:
    """AnimateDiff's `v2_lora_*.ckpt`: `…motion_modules.N.temporal_transformer.…attention_blocks.K.processor.to_q_lora.down.weight`."""
    import re

    sd = {}
    for (_, name), (down, up, _) in lora.items():
        m = re.sub(r"(motion_modules\.\d+)\.", r"\1.temporal_transformer.", name)
        m = m.replace(".attn1.", ".attention_blocks.0.").replace(".attn2.", ".attention_blocks.1.")
        layer = m.rsplit(".", 1)[1] if not m.endswith("to_out.0") else "to_out"
        base = m[: m.rindex(".to_")]
        sd[f"{base}.processor.{layer}_lora.down.weight"] = down.contiguous()
        sd[f"{base}.processor.{layer}_lora.up.weight"] = up.contiguous()
    return sd
