"""Token embeddings saved by other tools, read as one K-vector identity.

- the reference Magic-Me implementation (`save_embedding`): a `.pt` holding
  `{"string_to_param": {"*": (4, 768)}}`, the vectors of `<new1> … <new4>`, with no name;
- AUTOMATIC1111 / ComfyUI: `.pt` with `string_to_param`, `name`, `step`, `sd_checkpoint[_name]`, or a
  `.safetensors` with one tensor `emb_params` (no name);
- diffusers' textual-inversion script: `learned_embeds.bin`/`.safetensors` holding `{token: (K, 768) or (768,)}`.

All are read with `weights.read_weights` (no pickle code runs). SDXL embeddings (`clip_l`/`clip_g`) are refused:
magicme runs SD-1.5-family models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .weights import describe, read_weights


@dataclass(frozen=True)
class Embedding:
    vectors: torch.Tensor  # (K, hidden)
    token: str | None  # None: the file names no token
    source: str  # "a1111", "magic-me-reference", "diffusers"
    steps: int = 0
    base: str = ""  # the base model the file says it was trained on


def read_embedding(path: str | Path, flag: str = "--identity") -> Embedding:
    """The vectors and what the file says about them, from any supported layout."""
    obj = read_weights(path, flag)
    where = f"{flag} {str(path)!r}"
    if "string_to_param" in obj:  # A1111's and the reference implementation's .pt
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1 or not isinstance(next(iter(params.values())), torch.Tensor):
            raise ValueError(f"{where}: 'string_to_param' must hold exactly one tensor")
        vectors = next(iter(params.values()))
        name = obj.get("name")
        reference = set(obj) == {"string_to_param"}  # save_embedding writes nothing else
        base = obj.get("sd_checkpoint_name") or ""
        if obj.get("sd_checkpoint"):
            base = f"{base} [{obj['sd_checkpoint']}]".strip()
        steps = obj.get("step") if isinstance(obj.get("step"), int) else 0
        return Embedding(_matrix(vectors, where), name if isinstance(name, str) and name else None,
                         "magic-me-reference" if reference else "a1111", steps or 0, base)
    named = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if set(named) >= {"clip_l", "clip_g"}:
        raise ValueError(f"{where} is an SDXL embedding (clip_l/clip_g); magicme runs SD-1.5-family models")
    if set(named) == {"emb_params"}:  # A1111 .safetensors (magicme's own files are read by identity.py)
        return Embedding(_matrix(named["emb_params"], where), None, "a1111")
    if len(named) == 1:  # diffusers: {token: vectors}
        token, vectors = next(iter(named.items()))
        return Embedding(_matrix(vectors, where), token, "diffusers")
    raise ValueError(f"{where} is not a token embedding: it holds {describe(list(named))}")


def _matrix(t: torch.Tensor, where: str) -> torch.Tensor:
    """(hidden,) or (K, hidden) → (K, hidden) float32."""
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or t.shape[0] < 1 or not t.is_floating_point():
        raise ValueError(f"{where}: expected (vectors, width) floats, got {tuple(t.shape)} {t.dtype}")
    return t.detach().to(torch.float32).contiguous()
