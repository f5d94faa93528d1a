"""Identity files: the extended ID tokens of one subject (paper §4.2) as a small .safetensors file.

Layout: one tensor `emb_params` of shape (num_vectors, text hidden size) — the Kohya/A1111/ComfyUI
embedding form — plus string metadata (token, class word, num vectors, base model, steps), written in
sorted order so equal identities are equal files. Stock diffusers loads it with
`pipe.load_textual_inversion(path, token=token)`; the prompt's token then expands to
`token token_1 … token_{K-1}`, one per vector.

`--identity` also takes other tools' embeddings (`embeddings.py`), and `TOKEN=FILE` names the word a file
is used under (files that name none need it; it also lets two files trained as `<v*>` be used together).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch


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
    source: str = "magicme"  # magicme, or the tool a converted file came from (embeddings.py)
    base_fingerprint: str = ""  # the base model's weights hash (models.fingerprint), where known
    backbone: str = "animatediff"  # "wan": for Wan 2.x (wan_identity.py)
    form: str = "tokens"  # "tokens": K text-encoder rows; "lora": a LoRA on the transformer's attention
    rank: int = 0  # LoRA rank (form "lora")

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
                source=str(meta.get("source", "magicme")),
                base_fingerprint=str(meta.get("base_fingerprint", "")),
                backbone=str(meta.get("backbone", "animatediff")),
                form=str(meta.get("form", "tokens")),
                rank=int(meta.get("rank", 0)),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"identity {str(path)!r} has malformed metadata ({e})") from None


def save_identity(path: str | Path, embeddings: torch.Tensor, info: IdentityInfo) -> Path:
    """Write the (num_vectors, hidden) embeddings with `info` as metadata, atomically and byte-reproducibly."""
    from .weights import write_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"identity output {str(path)!r} must end in .safetensors")
    emb = embeddings.detach().to("cpu", torch.float32).contiguous()
    if emb.ndim != 2 or emb.shape[0] != info.num_vectors:
        raise ValueError(f"embeddings must be ({info.num_vectors}, hidden), got {tuple(emb.shape)}")
    return write_safetensors(path, {EMBEDDING_KEY: emb}, info.metadata())


def split_spec(spec: str | Path) -> tuple[Path, str | None]:
    """'FILE' or 'TOKEN=FILE' → (file, token or None); a file that exists as given is never split."""
    text = str(spec)
    if "=" in text and not Path(text).expanduser().exists():
        token, path = text.split("=", 1)
        if token and not any(c.isspace() for c in token):
            return Path(path).expanduser(), token
    return Path(text).expanduser(), None


def _magicme_info(path: Path) -> IdentityInfo | None:
    """A magicme identity's metadata without reading its tensor; None for any other file."""
    if path.suffix.lower() != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            shape = tuple(f.get_slice(EMBEDDING_KEY).get_shape()) if keys == [EMBEDDING_KEY] else ()
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"--identity {str(path)!r} is not a readable .safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        return None
    info = IdentityInfo.from_metadata(meta, path)
    if info.form == "lora":
        if not keys or not all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
            raise ValueError(f"--identity {str(path)!r} says it is a LoRA but holds other tensors ({keys[:3]})")
    elif keys != [EMBEDDING_KEY]:
        raise ValueError(f"--identity {str(path)!r} holds {keys}, expected one tensor {EMBEDDING_KEY!r}")
    if info.form != "lora":
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


def check_identity_backbone(path: str | Path, info: IdentityInfo, backbone: str) -> None:
    """An identity is for one backbone: refuse a file trained for the other one (one line naming it)."""
    if info.backbone != backbone:
        names = {"animatediff": "AnimateDiff (SD-1.5)", "wan": "Wan 2.x"}
        raise ValueError(
            f"--identity {str(path)!r} is a {names.get(info.backbone, info.backbone)} identity ({info.form}); "
            f"this model is {names.get(backbone, backbone)}: use a {names.get(info.backbone, info.backbone)} base model or retrain for this one"
        )


def _foreign(path: Path, token: str | None, need_token: bool = True) -> tuple[torch.Tensor, IdentityInfo]:
    from .embeddings import read_embedding

    e = read_embedding(path)
    token = token or e.token or ""
    if not token and need_token:
        raise ValueError(
            f"--identity {str(path)!r} names no token ({e.source} embedding): give it one with --token, "
            f"e.g. --token '<{path.stem}>', or as --identity '<{path.stem}>={path}'"
        )
    info = IdentityInfo(token=token, class_word="", num_vectors=e.vectors.shape[0], base=e.base, steps=e.steps,
                        hidden_size=e.vectors.shape[1], masked=e.source == "magic-me-reference", source=e.source)
    return e.vectors, info


def read_identity_info(spec: str | Path) -> IdentityInfo:
    """What an identity says about itself (magicme files: metadata only, cheap enough for argument checks)."""
    path, token = split_spec(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--identity {str(path)!r} does not exist")
    info = _magicme_info(path)
    if info is None:
        return _foreign(path, token)[1]
    return replace(info, token=token) if token else info


def read_identity(spec: str | Path) -> tuple[torch.Tensor, IdentityInfo]:
    """The (num_vectors, hidden) float32 vectors and the info of any supported identity file."""
    from safetensors.torch import load_file

    path, token = split_spec(spec)
    info = read_identity_info(spec)
    if _magicme_info(path) is not None:
        emb = load_file(str(path))[EMBEDDING_KEY]
    else:
        emb = _foreign(path, token)[0]
    check_embedding_values(emb, path)
    return emb, info


def with_token(identities: list[str], token: str | None) -> list[str]:
    """`--token T`: the word for the one `--identity` file that names none (others keep theirs)."""
    if token is None:
        return identities

    def names_none(spec) -> bool:
        path, given = split_spec(spec)
        return given is None and path.is_file() and _magicme_info(path) is None and not _foreign(path, None, need_token=False)[1].token

    bare = [s for s in identities if names_none(s)]
    if len(bare) != 1:
        raise ValueError(
            f"--token {token!r} names the token of the one --identity file without its own; {len(bare)} such files "
            "were given: write each as --identity TOKEN=FILE"
        )
    return [f"{token}={s}" if s == bare[0] else s for s in identities]


def identity_record(spec: str | Path) -> dict:
    """The run record's entry for an identity: the file's fingerprint, content hash and the token it was used under."""
    from .models import fingerprint
    from .records import content_hash

    path = str(split_spec(spec)[0])
    return {**fingerprint(path), "token": read_identity_info(spec).token, "sha256": content_hash(path)}


def convert_identity(src: str | Path, out: str | Path, token: str | None = None, class_word: str | None = None) -> Path:
    """`magicme identity convert`: any supported identity file → magicme's .safetensors (never over an existing file)."""
    out = Path(out)
    spec = f"{token}={src}" if token else str(src)
    emb, info = read_identity(spec)
    if out.exists():
        raise FileExistsError(f"OUT {str(out)!r} exists; choose a new file name")
    from .outputs import check_output

    check_output(out, arg="OUT", inputs=[("IN", split_spec(spec)[0])], record=False)  # writable, not the input
    info = replace(info, class_word=class_word if class_word is not None else info.class_word, hidden_size=emb.shape[1])
    return save_identity(out, emb, info)


def describe_identity(spec: str | Path) -> dict:
    """`magicme identity info`: what the file holds and what it says about itself."""
    from .models import fingerprint

    path, token = split_spec(spec)
    if not path.is_file():
        raise FileNotFoundError(f"FILE {str(path)!r} does not exist")
    emb, info = read_identity(spec) if _magicme_info(path) else _foreign(path, token, need_token=False)
    return {
        "file": str(path), "format": info.source, "token": info.token, "vectors": emb.shape[0], "width": emb.shape[1],
        "class_word": info.class_word, "base": info.base, "base_fingerprint": info.base_fingerprint,
        "steps": info.steps, "norms": [round(float(n), 4) for n in emb.norm(dim=1)],
        "fingerprint": fingerprint(str(path)).get("fingerprint", ""),
    }


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


def id_tokens(token: str, num_vectors: int) -> list[str]:
    """The tokenizer words of a K-vector identity, as stock diffusers names them: token, token_1 … token_{K-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def load_identities(pipe, paths: list[str | Path]) -> list[IdentityInfo]:
    """Put each identity's vectors into `pipe`'s tokenizer and text encoder.

    A new token is added with stock `load_textual_inversion`. A token this pipeline already has (a reused
    model) gets its rows overwritten with the file's vectors, so the prompt always means the identity named
    now; a base-vocabulary word, or a known token with another number of vectors, is refused.
    """
    infos = [read_identity_info(p) for p in paths]
    check_prompt_tokens([], infos)
    added = set(pipe.tokenizer.get_added_vocab()) - set(pipe.tokenizer.all_special_tokens)
    for path, info in zip(paths, infos):
        check_identity_backbone(path, info, "animatediff")
    vocab = pipe.tokenizer.get_vocab()
    hidden = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for spec, info in zip(paths, infos):
        emb, _ = read_identity(spec)
        where = f"--identity {str(split_spec(spec)[0])!r}"
        if emb.shape[1] != hidden:
            raise ValueError(
                f"{where} has {emb.shape[1]}-wide embeddings but the base model's text encoder "
                f"is {hidden} wide: it was trained for another model family ({info.base or 'unknown'})"
            )
        words = id_tokens(info.token, info.num_vectors)
        if info.token not in vocab:
            pipe.load_textual_inversion(
                {info.token: emb.to(pipe.text_encoder.dtype)}, token=info.token, tokenizer=pipe.tokenizer,
                text_encoder=pipe.text_encoder,
            )
            continue
        if info.token not in added:
            raise ValueError(f"{where}: its token {info.token!r} is a word of the base model's vocabulary; use another token")
        known = next(i for i in range(1, len(vocab) + 1) if f"{info.token}_{i}" not in vocab)
        if known != info.num_vectors:
            raise ValueError(
                f"{where}: this model already holds token {info.token!r} with {known} vectors, the file has "
                f"{info.num_vectors}; give it another token (--identity TOKEN=FILE) or load a fresh model"
            )
        with torch.no_grad():
            weight = pipe.text_encoder.get_input_embeddings().weight
            weight[pipe.tokenizer.convert_tokens_to_ids(words)] = emb.to(weight.device, weight.dtype)
    return infos


def check_prompt_length(pipe, prompt: str) -> None:
    """CLIP reads 77 tokens (75 words + start/end); each identity token expands to K. Decide before encoding:
    a prompt whose identity vectors would fall past the limit is refused (the subject would silently vanish);
    one that loses only ordinary words is truncated as Stable Diffusion always does, with a warning naming them.
    """
    import logging

    tokenizer = pipe.tokenizer
    text = pipe.maybe_convert_prompt(prompt, tokenizer)  # the K-vector expansion the pipeline will apply
    ids = tokenizer(text, add_special_tokens=True).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return
    special = set(tokenizer.all_special_tokens)
    ours = {i for t, i in tokenizer.get_added_vocab().items() if t not in special}
    lost = [i for i in ids[limit - 1 : -1] if i in ours]
    words = len(ids) - 2
    if lost:
        token = tokenizer.convert_ids_to_tokens(lost[0])
        raise ValueError(
            f"--prompt {prompt[:60]!r}… is {words} tokens with the identity vectors expanded; the text encoder reads "
            f"{limit - 2}, so identity token {token!r} would be cut off: shorten the prompt or put the token earlier"
        )
    cut = tokenizer.decode(ids[limit - 1 : -1]).strip()
    logging.getLogger(__name__).warning("prompt is %d tokens, the text encoder reads %d: ignoring %r", words, limit - 2, cut)


def check_resume_compatible(path: str | Path, saved: IdentityInfo, wanted: IdentityInfo, saved_base: dict, wanted_base: dict) -> None:
    """A training checkpoint may only continue the same identity (token, vectors, class word) on the same base model."""
    for field_name in ("backbone", "form", "token", "num_vectors", "class_word", "hidden_size", "rank"):
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
