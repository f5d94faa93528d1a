"""Identities on Wan 2.x: extended ID tokens in the UMT5 text encoder, or a LoRA on the transformer's attention.

Two files, both `.safetensors` with magicme's identity metadata (`backbone: wan`, `form`):
- tokens (§4.2 on Wan): one tensor `emb_params` of K × d (d = 4096 for real Wan, UMT5-xxl's width). Loading
  adds the words `<v*>`, `<v*>_1` … to the tokenizer, writes the K rows into the text encoder's input
  embedding, and expands `<v*>` in prompts to the K words (the README shows the same steps by hand).
- lora: the LoRA of the transformer's self- and cross-attention (q, k, v, o) in Wan's original key layout
  (`diffusion_model.blocks.N.self_attn.q.lora_A.weight`, the form ComfyUI and most shared Wan LoRAs use),
  alpha = rank; stock diffusers loads it with `WanPipeline.load_lora_weights(path)`. Its token is the trigger
  word the LoRA was trained with, written in prompts as it is.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from .identity import IdentityInfo, check_identity_backbone, read_identity, read_identity_info
from .weights import write_safetensors

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' names of Wan's attention projections
_TO_WAN = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o"}
_DIFFUSERS_KEY = re.compile(r"^blocks\.(\d+)\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)\.(lora_[AB])\.weight$")


def id_token_words(token: str, num_vectors: int) -> list[str]:
    """`<v*>`, `<v*>_1` … `<v*>_{K-1}`: the words of a K-vector identity (stock diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def wan_lora_key(name: str) -> str:
    """diffusers/peft name `blocks.3.attn2.to_out.0.lora_B.weight` → Wan's `diffusion_model.blocks.3.cross_attn.o.lora_B.weight`."""
    m = _DIFFUSERS_KEY.match(name)
    if m is None:
        raise ValueError(f"not a LoRA weight of Wan's attention: {name!r}")
    block, attn, proj, ab = m.groups()
    return f"diffusion_model.blocks.{block}.{_TO_WAN[attn]}.{_TO_WAN[proj]}.{ab}.weight"


def save_wan_lora(path: str | Path, lora: dict[str, torch.Tensor], info: IdentityInfo) -> Path:
    """Write LoRA weights named as peft/diffusers name them (`blocks.N.attn1.to_q.lora_A.weight`) in Wan's layout."""
    tensors = {wan_lora_key(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in lora.items()}
    return write_safetensors(path, tensors, info.metadata())


def load_token_identity(pipe, path: str | Path, info: IdentityInfo) -> None:
    """Add the identity's K words to `pipe`'s tokenizer and write their rows into the UMT5 input embedding.

    A word already known (an identity loaded before into this pipeline) gets its rows replaced.
    """
    emb, _ = read_identity(path)
    table = pipe.text_encoder.get_input_embeddings()
    if emb.shape != (info.num_vectors, table.weight.shape[1]):
        raise ValueError(
            f"--identity {str(path)!r} holds {tuple(emb.shape)} embeddings but this Wan text encoder is "
            f"{table.weight.shape[1]} wide: it was trained for another Wan model ({info.base or 'unknown'})"
        )
    words = id_token_words(info.token, info.num_vectors)
    pipe.tokenizer.add_tokens(words)
    ids = pipe.tokenizer.convert_tokens_to_ids(words)
    if max(ids) >= table.weight.shape[0]:  # UMT5's table is padded past the tokenizer; grow it only if needed
        pipe.text_encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        table = pipe.text_encoder.get_input_embeddings()
    with torch.no_grad():
        table.weight[ids] = emb.to(table.weight.device, table.weight.dtype)


def require_peft(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ValueError(f"{what} needs peft: pip install 'magicme[wan]'")


def lora_adapter_name(path: str | Path) -> str:
    """A stable adapter name per file content (so a reused pipeline loads each file once)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    return f"identity_{digest}"


def load_wan_identities(pipe, paths: list[str | Path]) -> list[IdentityInfo]:
    """Load token and LoRA identities into a `WanPipeline`; only the LoRAs named here stay active."""
    infos = [read_identity_info(p) for p in paths]
    for path, info in zip(paths, infos):
        check_identity_backbone(path, info, "wan")
    active = []
    for path, info in zip(paths, infos):
        if info.form == "tokens":
            load_token_identity(pipe, path, info)
            continue
        require_peft(f"--identity {str(path)!r} (a LoRA)")
        name = lora_adapter_name(path)
        if name not in sum(pipe.get_list_adapters().values(), []):
            pipe.load_lora_weights(str(path), adapter_name=name)
        active.append(name)
    if active:
        pipe.enable_lora()
        pipe.set_adapters(active, [1.0] * len(active))
    elif any(pipe.get_list_adapters().values()):
        pipe.disable_lora()  # LoRAs of an earlier call on this pipeline
    return infos


def expand_identity_prompt(prompt: str, infos: list[IdentityInfo]) -> str:
    """Each token identity's `<v*>` becomes its K words; a LoRA's trigger word stays as written."""
    from .train import expand_prompt

    for info in infos:
        if info.form == "tokens":
            prompt = expand_prompt(prompt, info.token, info.num_vectors)
    return prompt
