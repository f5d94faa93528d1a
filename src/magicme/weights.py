"""Weight files on disk: safe reading of every format other tools share, and deterministic writing.

Pickled files (.ckpt/.pt/.pth/.bin) are read only with `torch.load(weights_only=True)`, which refuses a
pickle that carries code or objects other than tensors and plain containers without running it.
`describe` names what a file holds, so an error can say "this is a LoRA, not a motion module".
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from .outputs import atomic_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def read_weights(path: str | Path, what: str) -> dict:
    """Every entry of a .safetensors file, or the unpickled object of a pickle, read safely.

    `what` names the option in errors (e.g. '--lora'). A pickle's top-level object is returned as is
    (a dict of tensors, possibly nested under 'state_dict'); use `tensors` to flatten it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{what} {str(path)!r} is not a readable .safetensors file ({_first_line(e)})") from None
    if suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{what} {str(path)!r}: expected a {', '.join(WEIGHT_SUFFIXES)} file")
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        import re

        found = re.search(r"GLOBAL (\S+)", str(e))
        carries = f"it would call {found[1]}" if found else _first_line(e)
        raise ValueError(
            f"{what} {str(path)!r} is a pickle that holds more than tensors ({carries}); refused without "
            "running it. Convert it to .safetensors with a tool you trust"
        ) from None
    except Exception as e:  # truncated zips, not a pickle at all ...
        raise ValueError(f"{what} {str(path)!r} is not a readable PyTorch file ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {str(path)!r} holds a {type(obj).__name__}, not a dict of tensors")
    return obj


def tensors(obj: dict) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: unwrapped from 'state_dict'/'module', non-tensors dropped."""
    for wrapper in ("state_dict", "module"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def describe(keys: list[str]) -> str:
    """What a file of these tensor names is, in a few words, for error messages."""
    if not keys:
        return "no tensors"
    has = lambda *parts: any(all(p in k for p in parts) for k in keys)  # noqa: E731
    if has("motion_modules") and has("lora"):
        return "an AnimateDiff motion LoRA"
    if has("lora"):
        return "a LoRA"
    if has("motion_modules"):
        return "an AnimateDiff motion module"
    if has("model.diffusion_model."):
        return "a full Stable Diffusion checkpoint"
    if has("controlnet_cond_embedding"):
        return "a ControlNet"
    if has("string_to_param") or has("emb_params") or len(keys) <= 2 and not has("."):
        return "a textual-inversion embedding"
    if has("encoder.down") or has("decoder.up"):
        return "a VAE"
    sample = ", ".join(repr(k) for k in sorted(keys)[:3])
    return f"{len(keys)} tensors such as {sample}"


def write_safetensors(path: str | Path, named: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A .safetensors file with its header in sorted order, written atomically: same input, same bytes.

    (safetensors' own writer orders metadata by a per-process hash, so equal files differed byte for byte.)
    """
    path = Path(path)
    header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(named):
        t = named[name].detach().to("cpu").contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""  # reshape: 0-dim ones (kohya alphas) too
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    with atomic_file(path) as tmp:  # a killed write leaves a leftover the next write of `path` removes
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(text)))
            fh.write(text)
            for data in blobs:
                fh.write(data)
    return path


_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]
