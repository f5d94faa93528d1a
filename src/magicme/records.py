"""Run records and typed configs: what a stage ran, as JSON, and the config it was made from, rebuilt.

Every stage writes a run record beside its output (`video.write_sidecar`). Its `config` block is the
stage's config dataclass as JSON; `build_config` turns such a block (or a `magicme run` config table)
back into the dataclass, checking every key and value type against the dataclass's annotations, so a
wrong type is one line naming the key before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples and dicts as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def content_hash(path: str | Path) -> str:
    """sha256 over a file's bytes, or a folder's files (relative names and bytes), in a stable order."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def dtype_name(dtype) -> str:
    """torch.float16 → 'fp16' (the names `--dtype` takes)."""
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(dtype), str(dtype))


def runtime_record(pipe) -> dict:
    """The dtype and device a loaded pipeline actually ran in (not 'auto')."""
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer  # Wan: a transformer
    return {"dtype": dtype_name(model.dtype), "device": str(pipe._execution_device)}


def read_record(path: str | Path) -> dict:
    """A run record (`clip.mp4.json`), with errors naming --from-record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--from-record {str(path)!r} does not exist")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--from-record {str(path)!r} is not a JSON run record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError(f"--from-record {str(path)!r} holds no 'config' block (a record of magicme 0.x before records held one?)")
    return record


# ---- typed configs ----

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if hint in _TYPE_WORDS:
        return _TYPE_WORDS[hint]
    if hint is Path:
        return "a path"
    if hint is dict:
        return "a table"
    if hint is list:
        return "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys("null" if a is type(None) else _describe(a) for a in typing.get_args(hint)))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "a table"
    return getattr(hint, "__name__", str(hint))


def check_value(value: Any, hint: Any, name: str) -> Any:
    """`value` checked against type `hint` and converted where JSON/YAML lose the type (int → float, list → tuple,
    '32' → 32 as a dict key, a table → its dataclass). ValueError naming `name` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad():
        return ValueError(f"{name} must be {_describe(hint)}, got {value!r} ({type(value).__name__})")

    if hint is Any:
        return value
    if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan/.inf: black videos, not errors
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(value, arg, name)
            except ValueError:
                continue
        raise bad()
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise bad()
        return build_config(hint, value, name)
    if hint is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise bad()
        return value
    if hint in (dict, list):
        if not isinstance(value, hint):
            raise bad()
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"{name} must be a list of {len(args)} values, got {value!r}")
            return tuple(check_value(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [check_value(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        key_hint, value_hint = args or (Any, Any)
        out = {}
        for k, v in value.items():
            if key_hint is int and isinstance(k, str) and k.lstrip("-").isdigit():
                k = int(k)  # JSON keys are strings
            out[check_value(k, key_hint, f"{name} key")] = check_value(v, value_hint, f"{name}.{k}")
        return out
    return value  # a type we do not check (callables and the like)


def build_config(cls, data: dict, name: str):
    """An instance of dataclass `cls` from a dict, every key known and every value of its annotated type.

    `name` prefixes the keys in errors ('train' → 'train.steps must be an integer, got 'abc' (str)').
    """
    if not isinstance(data, dict):
        raise ValueError(f"{name} must be a table of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{name} does not take {unknown}; it takes {sorted(fields)}")
    return cls(**{k: check_value(v, hints[k], f"{name}.{k}") for k, v in data.items()})


def get_field(obj: Any, path: str) -> Any:
    """The value at a dotted field path of nested dataclasses ('models.speed.dtype')."""
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def has_field(obj: Any, path: str) -> bool:
    for name in path.split("."):
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, name)
    return True


def replace_field(obj: Any, path: str, value: Any) -> Any:
    """A copy of nested (possibly frozen) dataclasses with the field at `path` set to `value`."""
    head, _, rest = path.partition(".")
    return dataclasses.replace(obj, **{head: replace_field(getattr(obj, head), rest, value) if rest else value})


PATH_FIELDS = ("data", "images", "identities", "detector", "upscaler", "controlnet",
               "models.base", "models.motion_adapter", "models.base_config")


NAMED_SETTINGS = {"tiny", "hog", "cnn", "haar"}


def absolute_paths(cfg: Any) -> Any:
    """A copy of a stage config with its local file/folder fields made absolute, so a record works from any folder."""

    def resolve(value):
        if isinstance(value, list):
            return [resolve(v) for v in value]
        # names that are settings, not files ('tiny' preset, face detectors), stay names even if such a file exists
        local = isinstance(value, (str, Path)) and str(value) not in NAMED_SETTINGS and Path(value).exists()
        return str(Path(value).resolve()) if local else value

    for path in PATH_FIELDS:
        if has_field(cfg, path) and get_field(cfg, path) is not None:
            cfg = replace_field(cfg, path, resolve(get_field(cfg, path)))
    return cfg


# ---- repeating a run ----

RERUN_OWN = ("out", "resume", "checkpoint_dir")  # always the rerun's: it never writes over the recorded output
_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # a train record's dtype → --mixed-precision


def rerun_config(record: dict, cfg: Any, given: set[str]) -> Any:
    """The config of run record `record`, with the fields in `given` (dotted paths) and the output paths taken
    from `cfg` instead, and the dtype (precision) that actually ran in place of 'auto' unless it is given."""
    out = build_config(type(cfg), record["config"], "the record's config")
    for path in {*given, *RERUN_OWN}:
        if has_field(out, path):
            out = replace_field(out, path, get_field(cfg, path))
    ran = record.get("dtype")
    if record.get("task") == "train":
        if ran in _PRECISION and "mixed_precision" not in given:
            out = replace_field(out, "mixed_precision", _PRECISION[ran])
    elif ran and "models.speed.dtype" not in given and has_field(out, "models.speed.dtype"):
        out = replace_field(out, "models.speed.dtype", ran)
    return out


def changed_inputs(record: dict, cfg: Any, video: str | Path | None = None) -> list[tuple[str, str]]:
    """(what, path) of each recorded input whose content differs now: the input clip, the prepared set, identities."""
    inputs = [("input video", video, record.get("input", {}).get("sha256")),
              ("prepared set", getattr(cfg, "data", None) if record.get("task") == "train" else None, record.get("data_sha256"))]
    inputs += [("identity", i.get("name"), i.get("sha256")) for i in record.get("models", {}).get("identities", [])]
    return [(what, str(path)) for what, path, digest in inputs
            if digest and path and Path(path).exists() and content_hash(path) != digest]
