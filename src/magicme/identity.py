"""Identity files: the extended ID tokens of one subject (paper §4.2) as a small .safetensors file.

Layout: one tensor `emb_params` of shape (num_vectors, text hidden size) — the Kohya/A1111/ComfyUI
embedding form — plus string metadata (token, class word, num vectors, base model, steps). Stock
diffusers loads it with `pipe.load_textual_inversion(path, token=token)`; the prompt's token then
expands to `token token_1 … token_{K-1}`, one per vector.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .outputs import atomic_file

EMBEDDING_KEY = "emb_params"
FORMAT = "magicme.identity/1"


@dataclass(frozen=True)
class IdentityInfo:
    """What an identity file says about itself."""

    token: str
    class_word: str
    num_vectors: int
    base: str = ""
    steps: int = 0
    hidden_size: int = 0
    masked: bool = True

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, **{k: str(v) for k, v in asdict(self).items()}}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: str | Path) -> "IdentityInfo":
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("token"), str):
            raise ValueError(f"identity {str(path)!r} is not a magicme identity file (no token in its metadata)")
        try:
            return cls(
                token=meta["token"],
                class_word=str(meta.get("class_word", "")),
                num_vectors=int(meta.get("num_vectors", 0)),
                base=str(meta.get("base", "")),
                steps=int(meta.get("steps", 0)),
                hidden_size=int(meta.get("hidden_size", 0)),
                masked=meta.get("masked", "True") == "True",
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"identity {str(path)!r} has malformed metadata ({e})") from None


def save_identity(path: str | Path, embeddings: torch.Tensor, info: IdentityInfo) -> Path:
    """Write the (num_vectors, hidden) embeddings with `info` as metadata, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"identity output {str(path)!r} must end in .safetensors")
    emb = embeddings.detach().to("cpu", torch.float32).contiguous()
    if emb.ndim != 2 or emb.shape[0] != info.num_vectors:
        raise ValueError(f"embeddings must be ({info.num_vectors}, hidden), got {tuple(emb.shape)}")
    with atomic_file(path) as tmp:
        save_file({EMBEDDING_KEY: emb}, str(tmp), metadata=info.metadata())
    return path


def read_identity_info(path: str | Path) -> IdentityInfo:
    """Only the metadata (no tensor read): cheap enough for argument checks."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--identity {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            shape = tuple(f.get_slice(EMBEDDING_KEY).get_shape()) if keys == [EMBEDDING_KEY] else ()
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"--identity {str(path)!r} is not a readable .safetensors file ({e})") from None
    if keys != [EMBEDDING_KEY]:
        raise ValueError(f"--identity {str(path)!r} holds {keys}, expected one tensor {EMBEDDING_KEY!r}")
    info = IdentityInfo.from_metadata(meta, path)
    check_embedding_shape(shape, info, path)
    return info


def check_embedding_shape(shape: tuple[int, ...], info: IdentityInfo, path: str | Path) -> None:
    """The tensor must hold exactly the vectors the metadata claims, each as wide as it says."""
    if len(shape) != 2 or shape[0] < 1 or shape[0] != info.num_vectors or (info.hidden_size and shape[1] != info.hidden_size):
        raise ValueError(
            f"--identity {str(path)!r}: its metadata claims {info.num_vectors} vectors of width {info.hidden_size or '?'}, "
            f"but the tensor is {list(shape)}"
        )


def check_embedding_values(emb: torch.Tensor, path: str | Path) -> None:
    """NaN or inf vectors would make every frame black: refuse them on load."""
    if not torch.isfinite(emb).all():
        raise ValueError(f"--identity {str(path)!r} holds NaN/inf values (a diverged training); retrain it")


def read_identity(path: str | Path) -> tuple[torch.Tensor, IdentityInfo]:
    from safetensors.torch import load_file

    info = read_identity_info(path)
    emb = load_file(str(path))[EMBEDDING_KEY]
    check_embedding_values(emb, path)
    return emb, info


def token_pattern(token: str) -> re.Pattern:
    """The token as a whole word (so '<v*>' does not match inside '<v*>2')."""
    return re.compile(rf"(?<![\w<>*]){re.escape(token)}(?![\w<>*])")


def check_prompt_tokens(prompts: list[str], infos: list[IdentityInfo]) -> None:
    """Every prompt must name at least one loaded identity's token; say which tokens exist otherwise."""
    if not infos:
        return
    tokens = [i.token for i in infos]
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"--identity: two identity files use the same token ({', '.join(tokens)}); retrain one with another --token")
    for prompt in prompts:
        if not any(token_pattern(t).search(prompt) for t in tokens):
            names = " or ".join(repr(t) for t in tokens)
            example = f"a {tokens[0]} {infos[0].class_word}".strip()
            raise ValueError(f"--prompt {prompt!r} does not contain the identity token {names}; write it e.g. as {example!r}")


def load_identities(pipe, paths: list[str | Path]) -> list[IdentityInfo]:
    """Add each identity's tokens to `pipe`'s tokenizer and text encoder with stock `load_textual_inversion`."""
    infos = [read_identity_info(p) for p in paths]
    vocab = pipe.tokenizer.get_vocab()
    for path, info in zip(paths, infos):
        if info.token in vocab:
            continue  # already loaded into this pipeline (a reused model)
        emb, _ = read_identity(path)
        hidden = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        if emb.shape[1] != hidden:
            raise ValueError(
                f"--identity {str(path)!r} has {emb.shape[1]}-wide embeddings but the base model's text encoder "
                f"is {hidden} wide: it was trained for another model family ({info.base or 'unknown'})"
            )
        pipe.load_textual_inversion(
            {info.token: emb.to(pipe.text_encoder.dtype)}, token=info.token, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder
        )
    return infos


def check_resume_compatible(path: str | Path, saved: IdentityInfo, wanted: IdentityInfo, saved_base: dict, wanted_base: dict) -> None:
    """A training checkpoint may only continue the same identity (token, vectors, class word) on the same base model."""
    for field_name in ("token", "num_vectors", "class_word", "hidden_size"):
        a, b = getattr(saved, field_name), getattr(wanted, field_name)
        if a != b and (field_name != "hidden_size" or (a and b)):
            raise ValueError(
                f"--resume {str(path)!r} is from another identity: its {field_name} is {a!r}, this run's is {b!r}"
            )
    if saved_base != wanted_base:
        raise ValueError(
            f"--resume {str(path)!r} was trained on base model {saved_base.get('name')!r}"
            f" ({saved_base.get('fingerprint', saved_base.get('source', ''))}), not {wanted_base.get('name')!r}"
            f" ({wanted_base.get('fingerprint', wanted_base.get('source', ''))})"
        )
