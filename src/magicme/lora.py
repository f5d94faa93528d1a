"""LoRAs: style/character LoRAs of the image model and AnimateDiff motion LoRAs, mixed with an identity.

`--lora FILE[:SCALE]` takes kohya/A1111 files (`lora_unet_…`, `lora_te_…`) and diffusers/peft files;
`--motion-lora FILE[:SCALE]` takes AnimateDiff's `v2_lora_*.ckpt` camera-motion LoRAs and their diffusers
copies. Files are read safely (`weights.read_weights`) and handed as state dicts to diffusers'
`load_lora_weights` (peft), which converts the kohya layout; each becomes one named adapter and
`set_adapters` gives each its scale. The paper's "mix and match" (§1): the identity's tokens live in the
text encoder's embeddings, a LoRA in its linear layers and the UNet's, so both apply at once.
"""

from __future__ import annotations

from pathlib import Path

from .weights import describe, read_weights, tensors


def parse_lora(entry: str, flag: str = "--lora") -> tuple[str, float]:
    """'FILE' or 'FILE:SCALE' → (path, scale); a path that exists as given is never split."""
    text = str(entry).strip()
    if not text:
        raise ValueError(f"{flag} needs a file, got an empty value")
    path, scale = text, 1.0
    if not Path(text).expanduser().exists() and ":" in text:
        head, tail = text.rsplit(":", 1)
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass  # a colon in the path itself (C:\...), no scale
    return path, scale


def check_lora_entries(entries, flag: str) -> list[tuple[str, float]]:
    """Parse and check every entry: the file exists and its scale is finite."""
    import math

    out = []
    for entry in entries:
        path, scale = parse_lora(entry, flag)
        if not math.isfinite(scale):
            raise ValueError(f"{flag} {entry!r}: the scale must be a finite number")
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"{flag} {path!r} does not exist")
        out.append((path, scale))
    return out


def read_lora(path: str, motion: bool) -> dict:
    """The LoRA's tensors, checked to be the kind the flag asks for."""
    from .motion import motion_lora_state

    flag = "--motion-lora" if motion else "--lora"
    state = tensors(read_weights(path, flag))
    kind = describe(list(state))
    if motion:
        if kind != "an AnimateDiff motion LoRA":
            hint = "; pass it with --lora" if kind == "a LoRA" else ""
            raise ValueError(f"{flag} {path!r} is not a motion LoRA: it holds {kind}{hint}")
        return motion_lora_state(state)
    if kind == "an AnimateDiff motion LoRA":
        raise ValueError(f"{flag} {path!r} is an AnimateDiff motion LoRA; pass it with --motion-lora")
    if not any("lora" in k for k in state):
        raise ValueError(f"{flag} {path!r} is not a LoRA: it holds {kind}")
    return state


def adapter_layers(module, name: str) -> int:
    """How many layers of `module` carry the peft adapter `name`."""
    return sum(1 for m in module.modules() if name in getattr(m, "lora_A", {}))


def load_lora(pipe, path: str, name: str, motion: bool = False) -> None:
    """Load one LoRA file into `pipe` as adapter `name`; refuse a file none of whose layers exist in the model."""
    state = read_lora(path, motion)
    flag = "--motion-lora" if motion else "--lora"
    try:
        pipe.load_lora_weights(state, adapter_name=name)
    except (ValueError, KeyError, RuntimeError) as e:  # shapes of another model family, unknown layouts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{flag} {path!r} does not fit the base model ({first[:200]})") from None
    text_encoder = getattr(pipe, "text_encoder", None)
    if not adapter_layers(pipe.unet, name) and not (text_encoder is not None and adapter_layers(text_encoder, name)):
        raise ValueError(f"{flag} {path!r}: none of its {len(state)} tensors name a layer of the base model")


def apply_loras(pipe, loras=(), motion_loras=(), preset: tuple[str, float] | None = None) -> list[tuple[str, float]]:
    """Load every LoRA into `pipe` and activate them with their scales; returns [(adapter name, scale)].

    `preset` is an adapter already loaded (a speed preset's own LoRA) to keep active beside them.
    """
    active = [preset] if preset else []
    for i, (path, scale) in enumerate(check_lora_entries(loras, "--lora")):
        load_lora(pipe, path, f"lora{i}")
        active.append((f"lora{i}", scale))
    for i, (path, scale) in enumerate(check_lora_entries(motion_loras, "--motion-lora")):
        load_lora(pipe, path, f"motion_lora{i}", motion=True)
        active.append((f"motion_lora{i}", scale))
    if active:
        pipe.set_adapters([n for n, _ in active], [s for _, s in active])
    return active


def lora_record(loras=(), motion_loras=()) -> dict:
    """The LoRAs of a run for its record: each file's fingerprint and scale."""
    from .models import fingerprint

    out = {}
    for key, entries, flag in (("loras", loras, "--lora"), ("motion_loras", motion_loras, "--motion-lora")):
        if entries:
            out[key] = [{**fingerprint(p), "scale": s} for p, s in (parse_lora(e, flag) for e in entries)]
    return out
