"""The web UI's handlers: plain functions of a `Workspace` and the form's values, run headless by the tests.

Each handler returns (or, for long jobs, yields after every step) a dict from output names to new
values; names it leaves out keep what the page shows. `guarded` turns any failure into a `Problem`
status line in the UI's own words (no CLI flag names, no server folders), which stays on the page
until the next action. `ui.py` only lays the components out and wires these functions to them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .runner import MODEL_HINT, Cancelled, stream, unusable_models
from .workspace import Workspace, video_prompt

log = logging.getLogger(__name__)

MODEL_FIELDS = ("base", "motion_adapter", "base_config", "scheduler", "preset", "loras", "motion_loras", "freeu", "clip_skip",
                "backbone")
# the fields that mean something only on AnimateDiff: the page hides them on Wan, the shared checks refuse them
ANIMATEDIFF_FIELDS = ("motion_adapter", "base_config", "scheduler", "preset", "loras", "motion_loras", "freeu", "clip_skip",
                      "loras_files", "motion_loras_files", "prompt_travel", "context_length", "context_stride",
                      "window_weighting", "free_init")
GENERATE_FIELDS = ("prompt", "negative_prompt", "identities", "gamma", "frames", "width", "height", "steps", "seeds",
                   "guidance", "fps", "prompt_travel", "context_length", "context_stride", "window_weighting",
                   "free_init", "preview_every")
MAX_SEEDS = 16  # clips per request
# The CLI's flag → the label of the form field that sets it (messages come from code shared with the CLI)
FIELD_LABELS = {
    "--prompt-at": "Prompt travel", "--prompt": "Prompt", "--negative-prompt": "Negative prompt", "--gamma": "γ",
    "--frames": "Frames", "--fps": "FPS", "--steps": "Steps", "--guidance": "Guidance", "--seed": "Seeds",
    "--height": "Height", "--width": "Width", "--free-init": "FreeInit iterations", "--context-length": "Window frames",
    "--context-stride": "Window stride", "--window-weighting": "Window blend", "--identity": "Identity",
    "--token": "Token", "--num-vectors": "Vectors", "--lr": "Learning rate", "--class-word": "Class word",
    "--base": "Base model", "--base-config": "Base config", "--motion-adapter": "Motion adapter",
    "--scheduler": "Scheduler", "--preset": "Speed preset", "--scale": "Upscale ×", "--strength": "Strength",
    "--clip-model": "CLIP model", "--dino-model": "DINO model", "--masks": "Masks", "--segmenter": "Segmenter",
    "--checkpoint-every": "Preview every", "--data": "Reference set", "--images": "Photos",
    "--lora": "LoRA", "--motion-lora": "Motion LoRA", "--freeu": "FreeU", "--clip-skip": "Clip skip",
    "--backbone": "Backbone", "--form": "Identity form", "--lora-rank": "LoRA rank",
}
LORA_HINT = "a LoRA uploaded here, or a LoRA file on the server"
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class Problem(str):
    """A status line that reports a failure (the page shows it in red until the next action)."""


def ui_terms(message: str) -> str:
    """A message from code shared with the CLI, in the form's words: '--prompt …' → 'Prompt …'."""
    text = _FLAG.sub(lambda m: FIELD_LABELS.get(m.group(), m.group()[2:].replace("-", " ").capitalize()), message)
    return text.replace("Prompt travel (prompt travel)", "Prompt travel")  # the CLI's message explains its flag


def problem(error: BaseException, ws: Workspace | None = None) -> Problem:
    """What failed, in one line of the UI's words."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        text = "out of GPU memory: try fewer frames, a smaller width/height, or one clip at a time"
    elif isinstance(error, (ValueError, FileNotFoundError, FileExistsError)):
        text = ui_terms(str(error))
    else:  # a bug or a library failure: the page says so, the console keeps the traceback
        log.error("web UI: unexpected error", exc_info=error)
        text = f"unexpected {type(error).__name__}: {error} (the server's console has the details)"
    text = " ".join(text.split())
    return Problem("Error: " + (ws.relative(text) if ws is not None else text))


def guarded(handler: Callable, status: str, ws: Workspace | None = None) -> Callable[..., Iterator[dict]]:
    """`handler` as a generator of output dicts whose failure becomes a `Problem` in output `status`."""
    def run(*args, **kwargs) -> Iterator[dict]:
        try:
            out = handler(*args, **kwargs)
            if isinstance(out, dict):
                yield out
            else:
                yield from out
        except Exception as e:  # every failure ends as a readable line on the page, never a silent stop
            yield {status: problem(e, ws)}
    return run


# ---- form values


def model_spec(base: str, motion_adapter: str = "", base_config: str = "", scheduler: str = "ddim", preset: str = "full",
               loras: str = "", motion_loras: str = "", freeu: str = "", clip_skip=0, backbone: str = "auto",
               ws: Workspace | None = None):
    """The form's model fields as a `ModelSpec` (blank fields mean the defaults); `ws` resolves uploaded LoRAs' names.

    `backbone` "auto" reads the base model's files; "wan" with base `tiny` is the tiny Wan preset.
    """
    from .models import TINY, ModelSpec

    return ModelSpec(
        base=(base or "").strip() or TINY,
        motion_adapter=(motion_adapter or "").strip() or None,
        base_config=(base_config or "").strip() or None,
        scheduler=scheduler or "ddim",
        preset=preset or "full",
        loras=lora_entries(ws, loras, motion=False),
        motion_loras=lora_entries(ws, motion_loras, motion=True),
        freeu=parse_freeu(freeu),
        clip_skip=_int(clip_skip, "Clip skip", optional=True) or 0,
        backbone=backbone or "auto",
    )


def page_backbone(backbone: str | None, base: str | None) -> str:
    """The backbone the form names, for laying out the page: "auto" reads only a local folder's model_index.json
    (a hub id is resolved when a job runs, not on every keystroke)."""
    from .wan import WAN_T2V_PIPELINES

    if backbone in ("animatediff", "wan"):
        return backbone
    path = Path((base or "").strip() or "tiny").expanduser()
    try:
        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
    except (OSError, ValueError):
        index = {}
    return "wan" if index.get("_class_name") in WAN_T2V_PIPELINES else "animatediff"


def backbone_defaults(backbone: str, frames, fps, lr, form: str = "tokens") -> dict:
    """The Generate/Train fields that follow the backbone: a field still at another setting's default takes this one's
    (16 frames at 8 fps ↔ Wan's 81 at 16; learning rate 1e-3 for ID tokens ↔ 1e-4 for a Wan LoRA); a typed value stays."""
    from .generate import GenerateConfig
    from .train import TrainConfig
    from .wan import WanDefaults

    ad, wan = config_defaults(GenerateConfig), WanDefaults()
    token_lr, lora_lr = config_defaults(TrainConfig)["lr"], 1e-4  # WanTrainConfig's LoRA default
    choices = {"frames": (ad["frames"], wan.frames), "fps": (ad["fps"], wan.fps), "lr": (token_lr, lora_lr)}
    pick = {"frames": backbone == "wan", "fps": backbone == "wan", "lr": backbone == "wan" and form == "lora"}
    out = {}
    for key, value in (("frames", frames), ("fps", fps), ("lr", lr)):
        mine, other = choices[key][pick[key]], choices[key][not pick[key]]
        if value is None or value == "" or _same(value, other):
            out[key] = mine
    return out


def _same(value, default) -> bool:
    try:
        return math.isclose(float(value), float(default), rel_tol=1e-9)
    except (TypeError, ValueError):
        return False


def training_spec(spec):
    """What `magicme train` takes of the model fields: the image LoRAs stay (the identity is tuned to them), not the sampling options."""
    return dataclasses.replace(spec, motion_loras=(), freeu=None, clip_skip=0)


def lora_entries(ws: Workspace | None, text: str | None, motion: bool) -> tuple[str, ...]:
    """'NAME[:SCALE]' lines → the `ModelSpec` entries 'PATH:SCALE'.

    NAME is a LoRA uploaded to this workspace or a file on the server; a server path that is no
    readable LoRA of the asked kind gets one message whether or not it exists (no existence oracle).
    """
    from .lora import read_lora

    label = "Motion LoRAs" if motion else "LoRAs"
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, scale = line, 1.0
        head, sep, tail = line.rpartition(":")
        if sep and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", tail):
            name, scale = head.strip(), float(tail)
        if ws is not None and name in ws.loras():
            path = ws.lora_path(name)
        else:
            path = Path(name).expanduser()
            try:
                usable = path.is_absolute() and path.is_file()
                if usable:
                    read_lora(str(path), motion)
            except (ValueError, OSError):
                usable = False
            if not usable:
                raise ValueError(f"{label}: {name!r} is not a usable {label[:-1].replace('Motion', 'motion')} ({LORA_HINT}, by its full path)")
        out.append(f"{path}:{scale!r}")
    return tuple(out)


def parse_freeu(text: str | None):
    """The FreeU field: blank → the preset's; 'on' → SD-1.5's values; 'B1,B2,S1,S2' → those (checked by `ModelSpec.check`)."""
    text = (text or "").strip().lower()
    if not text:
        return None
    if text in ("on", "yes", "sd15", "sd-1.5"):
        return True
    try:
        return tuple(float(v) for v in re.split(r"[,\s]+", text))
    except ValueError:
        raise ValueError(f"FreeU takes 'on' or four numbers b1, b2, s1, s2 such as 1.5, 1.6, 0.9, 0.2, got {text!r}") from None


def check_model_box(label: str, value: str | None) -> None:
    """Refuse a model box that names no usable model, with one message whether or not the path exists (no existence oracle).

    A local path must be a diffusers/transformers folder (model_index.json or config.json) or a
    .safetensors file whose header reads; anything else fails here, before any job is queued, so a
    missing path and a folder of other files look the same. A name that is no local path is a hub id.
    """
    from .models import TINY

    value = (value or "").strip()
    if value in ("", TINY):
        return
    path = Path(value).expanduser()
    try:
        if not path.exists() and _HUB_ID.match(value):
            return
        usable = (path.is_dir() and any((path / f).is_file() for f in ("model_index.json", "config.json"))) or (
            path.is_file() and path.suffix.lower() == ".safetensors" and _safetensors_header(path))
    except OSError:
        usable = False
    if not usable:
        raise ValueError(f"{label}: not a usable model ({MODEL_HINT})")


def _safetensors_header(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return bool(list(f.keys()))
    except Exception:  # any unreadable file is simply not a model; the message is the same either way
        return False


def check_model_boxes(model) -> None:
    for label, value in zip(("Base model", "Motion adapter", "Base config"), model[:3]):
        check_model_box(label, value)


def is_tiny(base: str | None) -> bool:
    """Whether the base model field names the random-weight tiny preset (blank means it too)."""
    return (base or "").strip() in ("", "tiny")


def config_defaults(cls) -> dict:
    """A config dataclass's plain defaults: the UI shows the ones the CLI and the Python API use."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _int(value, name: str, optional: bool = False) -> int | None:
    """A whole number from a form field; blank is None where `optional`."""
    if optional and (value is None or str(value).strip() == ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _float(value, name: str, optional: bool = False) -> float | None:
    """A number from a form field; blank is None where `optional`."""
    if optional and (value is None or str(value).strip() == ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def parse_seeds(text) -> list[int]:
    """'3', '0, 1, 2', '0 1 2' or '0-3' (inclusive) → seeds, one clip each."""
    seeds: list[int] = []
    for part in re.split(r"[,\s]+", str(text if text is not None else "").strip()):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"Seeds: {part!r} is not a seed; give whole numbers such as '0, 1, 2' or a range '0-3'")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last >= 2**63 or last - first >= MAX_SEEDS:
            raise ValueError(f"Seeds: {part!r} is out of range (seeds below 2^63, at most {MAX_SEEDS} clips)")
        seeds.extend(range(first, last + 1))
    if not seeds:
        raise ValueError("Seeds: give at least one seed, e.g. 0 (Random seed rolls one)")
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f"Seeds: {len(seeds)} seeds, at most {MAX_SEEDS} clips per request")
    return seeds


def random_seed() -> int:
    return random.randrange(2**32)


def parse_travel(text: str) -> dict[int, str]:
    """'FRAME: prompt' lines (blank lines skipped) as generate's `prompt_at`."""
    from .long_video import parse_prompt_at

    return parse_prompt_at([line for line in (text or "").splitlines() if line.strip()])


class Progress:
    """Step counts → a status line with the time left, from the pace since the first step reported."""

    def __init__(self):
        self.key, self.started, self.first = object(), 0.0, 0

    def line(self, what: str, step: int, steps: int | None, key=None) -> str:
        if key != self.key:  # a new clip or stage: its own pace
            self.key, self.started, self.first = key, time.monotonic(), step
        if not steps:
            return f"{what}: step {step}"
        left = (time.monotonic() - self.started) / (step - self.first) * (steps - step) if self.first < step < steps else 0
        tail = "" if not left else f" · {left:.0f} s left" if left < 90 else f" · {left / 60:.0f} min left"
        return f"{what}: step {step}/{steps}{tail}"


def waiting(payload: dict) -> str | None:
    """The status line of a queue report, or None for other reports."""
    if "queued" in payload:
        n = payload["queued"]
        return f"Waiting for {n} job{'s' if n != 1 else ''} ahead of this one (Cancel leaves the queue)…"
    if "running" in payload:
        return "Loading the model…"
    return None


# ---- photos and masks

NO_EDIT = {"mask_editor": None, "mask_index": None}  # another set: the mask editor closes


def on_upload(ws: Workspace, files: list[str] | None, class_word: str) -> dict:
    """Store uploaded photos as a new reference set; an unreadable photo is skipped and named."""
    name, skipped = ws.save_references(files or [], class_word)
    images, record = ws.reference_set(name)
    status = f"Stored {record['count']} photo(s) of a {record['class_word']} as {name}."
    if skipped:
        status += f" Skipped {len(skipped)}: " + "; ".join(skipped) + "."
    return {"ref_set": name, "photos": photo_items(ws, name), "upload_status": status, **masks_view(ws, name), **NO_EDIT}


def photo_items(ws: Workspace, name: str | None) -> list[tuple[str, str]]:
    """(stored photo, the name it was uploaded as) per photo of a set."""
    if not name:
        return []
    images, record = ws.reference_set(name)
    names = record.get("names") or [p.name for p in images]
    return [(str(p), n) for p, n in zip(images, names)]


def on_pick_set(ws: Workspace, name: str | None) -> dict:
    """The stored photos, class word and masks of a reference set."""
    if not name:
        return {"photos": [], "class_word": "", **masks_view(ws, None), **NO_EDIT}
    _, record = ws.reference_set(name)
    return {"photos": photo_items(ws, name), "class_word": record["class_word"], **masks_view(ws, name), **NO_EDIT}


def masks_view(ws: Workspace, name: str | None, manifest: dict | None = None) -> dict:
    """What the page shows of a prepared set: status with the segmenter used, contact sheet, masks."""
    from .prepare import read_manifest

    folder = ws.prepared(name) if name else None
    if folder is None:
        status = "No masks yet: make them (or upload your own), then train." if name else ""
        return {"prepare_status": status, "contact": None, "masks": []}
    manifest = manifest or read_manifest(folder)
    masks = [(str(folder / item["mask"]), f"{i + 1}: {item['mask_method']} · {item['mask_area']:.0%} of the image")
             for i, item in enumerate(manifest["items"])]
    edited = sum(item["mask_method"] == "user" for item in manifest["items"])
    how = re.sub(r" \([^()]{40,}\)", "", ui_terms(manifest["segmentation"]))  # the library's long reason stays in the manifest
    if "user masks" in how:
        how = "your masks"
    elif edited:
        how += f", {edited} painted by you"
    status = f"Masks of {len(masks)} photo(s) by {how}. Check them (click one to paint it), then train."
    return {"prepare_status": status, "contact": str(folder / "contact_sheet.png"), "masks": masks}


def on_prepare(ws: Workspace, name: str | None, segmenter: str = "auto", mask_files: list[str] | None = None, job=None) -> Iterator[dict]:
    """Make the subject masks of a reference set (§4.2), or take the user's own masks (matched by file name)."""
    if not name:
        raise ValueError("Reference set: save or pick a set of photos first")
    if mask_files:
        ws.save_masks(name, mask_files)
    job = job or ws.new_job("prepare")
    yield {"prepare_status": "Making the masks…", "job": job.id}
    try:
        for kind, value in stream(lambda report: ws.prepare(name, segmenter or "auto", bool(mask_files), report, job)):
            if kind == "progress":
                line = waiting(value)
                if line:
                    yield {"prepare_status": line.replace("Loading the model", "Loading the segmenter")}
            else:
                yield masks_view(ws, name, value)
    except Cancelled:
        yield {"prepare_status": "Cancelled; the masks are as they were."}


SUBJECT_RGB, NOT_SUBJECT_RGB = (255, 32, 32), (32, 96, 255)  # the two brushes of the mask editor


def mask_overlay(photo, mask):
    """The photo with the subject tinted red, as the mask editor shows it: (H, W, 3) uint8."""
    import numpy as np

    rgb = np.asarray(photo.convert("RGB")).astype(np.float32)
    out = rgb * 0.8
    out[mask] = rgb[mask] * 0.45 + np.array(SUBJECT_RGB) * 0.55
    return out.round().astype(np.uint8)


def on_pick_mask(ws: Workspace, name: str | None, index: int | None) -> dict:
    """Open mask `index` of a prepared set in the editor: the photo with the subject tinted red, ready to paint on."""
    if not name or ws.prepared(name) is None or index is None:
        raise ValueError("Masks: make the masks first, then click one to paint it")
    image, mask = ws.mask(name, int(index))
    return {"mask_editor": {"background": mask_overlay(image, mask), "layers": [], "composite": None},
            "mask_index": int(index), "paint": True,
            "mask_status": f"Mask {int(index) + 1}: paint with red what belongs to the subject, with blue what does not, then save."}


def painted_mask(value, mask):
    """`mask` (H, W) bool changed by the strokes in the editor's layers: red strokes add to the subject, blue ones remove."""
    import numpy as np
    from PIL import Image

    add = np.zeros(mask.shape, bool)
    remove = np.zeros(mask.shape, bool)
    for layer in (value or {}).get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            continue
        if layer.shape[:2] != mask.shape:  # an editor canvas of another size
            layer = np.asarray(Image.fromarray(layer).resize(mask.shape[::-1], Image.NEAREST))
        painted = layer[..., 3] > 0
        red = layer[..., 0].astype(int) > layer[..., 2].astype(int)
        add |= painted & red
        remove |= painted & ~red
    if not (add.any() or remove.any()):
        raise ValueError("Masks: nothing painted yet; paint on the photo with the red or blue brush")
    return (mask | add) & ~remove


def on_save_mask(ws: Workspace, name: str | None, index: int | None, value) -> dict:
    """Keep the painted mask as the prepared mask of its photo."""
    if not name or index is None:
        raise ValueError("Masks: click a mask to open it in the editor first")
    _, mask = ws.mask(name, int(index))
    manifest = ws.set_mask(name, int(index), painted_mask(value, mask))
    return {**masks_view(ws, name, manifest), **on_pick_mask(ws, name, int(index)),  # the editor shows the saved mask
            "mask_status": f"Saved mask {int(index) + 1}; training uses it."}


# ---- identities


def on_train(ws: Workspace, model, name: str | None, token: str, steps, lr, num_vectors, masked: bool, seed,
             preview_every=0, form: str = "tokens", lora_rank=16, job=None) -> Iterator[dict]:
    """Train an identity on a prepared set, with the loss curve and checkpoint previews as they come.

    On Wan `form` is "tokens" (ID tokens in UMT5) or "lora" (a LoRA of rank `lora_rank`); AnimateDiff takes tokens only.
    """
    import pandas as pd

    from .train import TrainConfig

    if not name:
        raise ValueError("Reference set: save or pick a set of photos first")
    check_model_boxes(model)
    full = model_spec(*model, ws=ws)
    settings = dict(
        data="",
        token=(token or "").strip(),
        steps=_int(steps, "Steps"),
        lr=_float(lr, "Learning rate"),
        num_vectors=_int(num_vectors, "Vectors"),
        masked=bool(masked),
        seed=_int(seed, "Seed"),
        checkpoint_every=_int(preview_every, "Preview every", optional=True) or 0,
        models=training_spec(full),
    )
    form = form or "tokens"
    with unusable_models():
        wan = full.resolved_backbone() == "wan"
    if wan:  # the whole model section is checked: Wan refuses the AnimateDiff-only fields rather than dropping them
        from .wan_train import WanTrainConfig

        cfg = WanTrainConfig(**{**settings, "models": full}, form=form, lora_rank=_int(lora_rank, "LoRA rank"))
    elif form != "tokens":
        raise ValueError(f"Identity form {form}: a LoRA identity is for the Wan backbone; an AnimateDiff identity is ID tokens")
    else:
        cfg = TrainConfig(**settings)
    job = job or ws.new_job("train")
    losses: list[tuple[int, float]] = []
    previews: list[tuple[str, str]] = []

    def curve():  # typed columns even when empty, or the plot takes them for categories
        steps, values = zip(*losses) if losses else ((), ())
        return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "loss": pd.Series(values, dtype="float64")})

    progress = Progress()
    left_out = [what for what, on in (("motion LoRAs", full.motion_loras), ("FreeU", full.freeu is not None),
                                      ("clip skip", full.clip_skip)) if on]
    note = f" (training leaves out {', '.join(left_out)}: they apply when generating)" if left_out else ""
    yield {"train_status": "Starting…" + note, "loss": curve(), "checkpoints": [], "job": job.id}
    try:
        for kind, value in stream(lambda report: ws.train(name, cfg, report, job)):
            if kind == "done":
                what = f"Wan LoRA, trigger word {cfg.token}" if getattr(cfg, "form", "tokens") == "lora" else f"token {cfg.token}"
                yield {"train_status": f"Done: identity {value} ({what}). Use it in Generate.",
                       "loss": curve(), "trained": value}
            elif "checkpoint" in value:
                previews.append((value["preview"], f"step {value['checkpoint']}"))
                yield {"checkpoints": list(previews)}
            elif "loss" in value:
                losses.append((value["step"], value["loss"]))
                yield {"train_status": progress.line("Training", value["step"], value["steps"]) + f" · loss {value['loss']:.4f}",
                       "loss": curve()}
            elif waiting(value):
                yield {"train_status": waiting(value)}
    except Cancelled:
        yield {"train_status": "Cancelled; no identity was written."}


def on_import_identity(ws: Workspace, file: str | None) -> dict:
    name = ws.import_identity(file)
    return {"import_status": f"Imported identity {name}.", "identity": name}


def on_upload_loras(ws: Workspace, files, current: str, motion: bool = False) -> dict:
    """Store uploaded LoRAs (motion LoRAs) and add a 'NAME:1.0' line for each to its field; an unusable file is skipped by name."""
    key = "motion_loras" if motion else "loras"
    files = [f for f in (files or []) if f]
    if not files:
        raise ValueError(f"{'Motion LoRAs' if motion else 'LoRAs'}: upload a .safetensors or .ckpt file")
    added, skipped = [], []
    for f in files:
        try:
            added.append(ws.import_lora(f, motion))
        except ValueError as e:
            skipped.append(ui_terms(str(e)))
    if not added:
        raise ValueError("; ".join(skipped))
    lines = [line for line in (current or "").splitlines() if line.strip()] + [f"{n}:1.0" for n in added]
    status = f"Added {', '.join(added)} at scale 1.0 (edit the number after the colon to change it)."
    if skipped:
        status += " Skipped " + "; ".join(skipped)
    return {key: "\n".join(lines), "model_status": status}


# ---- generate


def on_generate(ws: Workspace, model, prompt: str = "", negative_prompt: str = "", identities=None, gamma=0.15, frames=None,
                width=None, height=None, steps=None, seeds="0", guidance=None, fps=None, prompt_travel: str = "",
                context_length=None, context_stride=4, window_weighting: str = "pyramid", free_init=None,
                preview_every=0, job=None) -> Iterator[dict]:
    """Generate one clip per seed; yield the status, a preview of the frames while denoising, and each clip as it is done.

    Blank steps/guidance take the speed preset's (Wan: 50 and 5), blank width/height the model's size, blank
    frames/FPS the backbone's; `prompt_travel` holds 'FRAME: prompt' lines; on AnimateDiff clips over 16 frames
    or with travel run in FreeNoise windows (long_video.py), which Wan refuses (it denoises the whole clip).
    """
    from .generate import GenerateConfig
    from .wan_generate import default_clip

    check_model_boxes(model)
    prompt = (prompt or "").strip()
    models = model_spec(*model, ws=ws)
    with unusable_models():
        clip = default_clip(models)  # blank frames/FPS: the backbone's (16 at 8 fps; Wan 81 at 16)
    frames, fps = _int(frames, "Frames", optional=True), _int(fps, "FPS", optional=True)
    cfg = GenerateConfig(
        prompts=[prompt] if prompt else [],
        negative_prompt=negative_prompt or "",
        seeds=parse_seeds(seeds),
        frames=clip[0] if frames is None else frames,
        width=_int(width, "Width", optional=True),
        height=_int(height, "Height", optional=True),
        steps=_int(steps, "Steps", optional=True),
        guidance=_float(guidance, "Guidance", optional=True),
        gamma=_float(gamma, "γ"),
        fps=clip[1] if fps is None else fps,
        identities=list(identities or []),
        models=models,
        prompt_at=parse_travel(prompt_travel),
        context_length=_int(context_length, "Window frames", optional=True),
        context_stride=_int(context_stride, "Window stride"),
        window_weighting=window_weighting or "pyramid",
        free_init=_int(free_init, "FreeInit iterations", optional=True),
    )
    every = _int(preview_every, "Preview every", optional=True) or 0
    job = job or ws.new_job("generate")
    done: list[str] = []
    progress = Progress()
    yield {"gen_status": "Starting…", "preview": None, "job": job.id}
    try:
        for kind, value in stream(lambda report: ws.generate(cfg, report, job, preview_every=every)):
            if kind == "done":
                yield {"gen_status": f"Done: {len(value)} clip(s): {', '.join(value)}"}
            elif "clip_done" in value:
                done.append(value["clip_done"])
                yield {"gen_video": str(ws.video_path(value["clip_done"])), "gen_settings": ws.video_settings(value["clip_done"]),
                       "gen_clips": [clip_item(ws, n) for n in done], "gen_clip_names": list(done), "new_video": value["clip_done"]}
            elif "step" in value:
                what = "Denoising" + (f" clip {value['clip']}/{value['clips']}" if value["clips"] > 1 else "")
                out = {"gen_status": progress.line(what, value["step"], value["steps"], key=value["clip"])}
                if "preview" in value:
                    out["preview"] = value["preview"]
                yield out
            elif waiting(value):
                yield {"gen_status": waiting(value)}
    except Cancelled:
        kept = f"; the {len(done)} clip(s) finished before are kept" if done else "; nothing was written"
        yield {"gen_status": f"Cancelled{kept}.", "preview": None}


# ---- videos


def clip_caption(settings: dict) -> str:
    """A clip as a person tells it apart: what it shows, its seed, what made it, when."""
    prompt = video_prompt(settings)
    task = settings.get("task", "t2v")
    tag = {"face": "Face VCD · ", "upscale": f"×{settings.get('scale', 2)} · "}.get(task, "")
    when = (settings.get("created") or "")[11:16]
    return f"{tag}{prompt[:40]}{'…' if len(prompt) > 40 else ''} · seed {settings.get('seed', '?')}" + (f" · {when}" if when else "")


def clip_item(ws: Workspace, name: str) -> tuple[str, str]:
    """(thumbnail, caption) of one clip for a gallery."""
    return str(ws.thumbnail(name)), clip_caption(ws.video_settings(name))


def video_gallery(ws: Workspace) -> tuple[list[tuple[str, str]], list[str]]:
    """(thumbnail, caption) per clip, newest first, and the clip names in the same order (a gallery click gives an index)."""
    names = ws.videos()
    return [clip_item(ws, n) for n in names], names


def video_choices(ws: Workspace) -> list[tuple[str, str]]:
    """(label, name) per stored clip, newest first."""
    return [(clip_caption(ws.video_settings(n)), n) for n in ws.videos()]


def on_pick_video(ws: Workspace, name: str | None) -> dict:
    """A stored clip, its run record, its scores (beside its source's, for a refined clip), and the refine form's prompt and identities."""
    if not name:
        return {"lib_video": None, "lib_settings": None, "scores": "", "refine_prompt": "", "refine_identities": []}
    settings = ws.video_settings(name)
    return {"lib_video": str(ws.video_path(name)), "lib_settings": settings, "scores": scores_view(ws, name),
            "refine_prompt": video_prompt(settings), "refine_identities": ws.identity_names(settings)}


def scores_view(ws: Workspace, name: str) -> str:
    """The clip's last scores as a table, with its source's below when it was refined from a scored clip."""
    rows = [("this clip", ws.metrics(name))]
    source = ws.video_source(name)
    if source is not None:
        rows.append(("its source", ws.metrics(source)))
    rows = [(label, s) for label, s in rows if s]
    return metrics_table(rows) if rows else "Not scored yet."


def metrics_table(rows: list[tuple[str, dict]]) -> str:
    """Scores as a Markdown table in Table 1's order (higher is better for all)."""
    from .evaluate import METRICS

    names = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "temporal_dino": "T. Cons. (DINO)", "temporal_clip": "T. Cons. (CLIP)"}
    head = "| clip | " + " | ".join(names[m] for m in METRICS) + " |\n|" + " --- |" * (len(METRICS) + 1)
    lines = [f"| {label} | " + " | ".join(f"{s[m]:.4f}" if isinstance(s.get(m), float) else "—" for m in METRICS) + " |"
             for label, s in rows]
    return "\n".join([head, *lines])


def reuse_settings(ws: Workspace, name: str | None) -> dict:
    """The Generate form (and, for a refined clip, the Refine form) filled from a clip's run record.

    A refined clip's generate settings are its source's, when the source is still in this workspace.
    """
    if not name:
        raise ValueError("Videos: pick a clip first")
    settings = ws.video_settings(name)
    out: dict = {}
    if settings.get("task") in ("face", "upscale"):
        out.update(refine_strength=str(settings.get("strength", "")), refine_steps=settings.get("steps"),
                   refine_seed=settings.get("seed"), refine_prompt=settings.get("prompt", ""),
                   refine_identities=ws.identity_names(settings))
        if settings.get("task") == "upscale":
            out["refine_scale"] = settings.get("scale", 2)
        source = ws.video_source(name)
        if source is None:
            return out
        settings = ws.video_settings(source)
    if settings.get("task") != "t2v":
        return out
    return {**generate_form(ws, settings), **out}


def generate_form(ws: Workspace, record: dict) -> dict:
    """The Generate and Model fields that remake a t2v run record."""
    from .models import TINY, ModelSpec

    models = record.get("models", {})
    base = models.get("base", {}).get("name", TINY)
    preset = models.get("preset", "full")
    adapter = (models.get("motion_adapter") or {}).get("name", "")
    if preset != "full" or adapter == ModelSpec(base=base, preset=preset).adapter_name():
        adapter = ""  # the default the base or preset implies: leave the field blank
    schedule = record.get("prompt_at") or {}
    prompt = record.get("prompt") or ""
    travel = "\n".join(f"{k}: {v}" for k, v in schedule.items() if not (k == "0" and v == prompt))
    windows = record.get("windows") or {}
    form = {
        "backbone": record.get("backbone") or models.get("backbone") or "animatediff",
        "base": base, "motion_adapter": adapter, "base_config": models.get("base_config", ""), "preset": preset,
        "prompt": prompt, "negative_prompt": record.get("negative_prompt", ""), "identities": ws.identity_names(record),
        "gamma": record.get("gamma"), "frames": record.get("frames"), "width": str(record.get("width", "")),
        "height": str(record.get("height", "")), "steps": str(record.get("steps", "")), "seeds": str(record.get("seed", 0)),
        "guidance": str(record.get("guidance", "")), "fps": record.get("fps"), "prompt_travel": travel,
        "context_length": str(record.get("context_length") or ""), "context_stride": windows.get("stride", record.get("context_stride")),
        "window_weighting": record.get("window_weighting"), "free_init": str(record.get("free_init") or ""),
    }
    if preset == "full":  # a Wan record has no AnimateDiff scheduler: the field's default, which Wan accepts
        form["scheduler"] = models.get("scheduler") or ("ddim" if form["backbone"] == "wan" else None)
    form.update(formats_form(ws, models, preset))
    return {k: v for k, v in form.items() if v is not None}


def formats_form(ws: Workspace, models: dict, preset: str) -> dict:
    """The LoRA, FreeU and clip-skip fields that remake a run record's `models` entry."""
    from .models import PRESETS

    def lines(entries):
        return "\n".join(f"{ws.lora_name(e['name']) or e['name']}:{float(e.get('scale', 1.0))!r}" for e in entries or [])

    freeu = models.get("freeu")
    values = tuple(freeu[k] for k in ("b1", "b2", "s1", "s2")) if freeu else None
    return {"loras": lines(models.get("loras")), "motion_loras": lines(models.get("motion_loras")),
            "freeu": "" if values is None or values == (PRESETS[preset].freeu if preset in PRESETS else None) else ", ".join(f"{v:g}" for v in values),
            "clip_skip": models.get("clip_skip", 0)}


def on_refine(ws: Workspace, model, stage: str, video: str | None, prompt: str, identities, strength, steps, seed,
              scale=2, detector=None, job=None) -> Iterator[dict]:
    """Face VCD or Tiled VCD (upscale) on a stored clip (paper §4.3); the new clip becomes the picked one, ready to score.

    A blank strength takes the stage's paper default (0.8 face, 0.2 upscale, §5.2).
    """
    from .face import FaceConfig
    from .upscale import UpscaleConfig

    if not video:
        raise ValueError("Videos: pick a clip to refine")
    check_model_boxes(model)
    common = dict(prompt=(prompt or "").strip(), seed=_int(seed, "Seed"), steps=_int(steps, "Steps"),
                  identities=list(identities or []), models=model_spec(*model, ws=ws))
    if _float(strength, "Strength", optional=True) is not None:
        common["strength"] = _float(strength, "Strength")
    cfg = FaceConfig(**common) if stage == "face" else UpscaleConfig(**common, scale=_int(scale, "Upscale ×"))
    label = "Face VCD" if stage == "face" else "Tiled VCD"
    job = job or ws.new_job("refine")
    yield {"refine_status": f"{label}: starting…", "job": job.id}
    try:
        for kind, value in stream(lambda report: ws.refine(stage, video, cfg, report, detector=detector, job=job)):
            if kind == "done":
                settings = ws.video_settings(value)
                note = " (no face found: the clip is unchanged)" if stage == "face" and not settings.get("faces") else ""
                yield {"refine_status": f"Done: {value}{note}. It is now the picked clip: score it below.",
                       "refine_video": str(ws.video_path(value)), "refine_settings": settings, "new_video": value}
            elif "step" in value:
                yield {"refine_status": f"{label}: denoising step {value['step']}"}
            elif waiting(value):
                yield {"refine_status": f"{label}: {waiting(value)}"}
    except Cancelled:
        yield {"refine_status": "Cancelled; nothing was written."}


def on_evaluate(ws: Workspace, video: str | None, reference_set: str | None, clip_model: str, dino_model: str, job=None) -> Iterator[dict]:
    """Score a stored clip against a reference set (paper §5.2)."""
    from .evaluate import MetricModels

    if not video:
        raise ValueError("Videos: pick a clip to score")
    if not reference_set:
        raise ValueError("Reference set: pick the photos to compare the clip with")
    d = MetricModels()
    models = MetricModels(clip=(clip_model or "").strip() or d.clip, dino=(dino_model or "").strip() or d.dino)
    check_model_box("CLIP model", models.clip)
    check_model_box("DINO model", models.dino)
    job = job or ws.new_job("evaluate")
    yield {"eval_status": "Scoring…", "job": job.id}
    try:
        for kind, value in stream(lambda report: ws.evaluate(video, reference_set, models, report, job)):
            if kind == "done":
                yield {"eval_status": f"Scored {video} against {reference_set}.", "scores": scores_view(ws, video), "metrics": value}
            elif "stage" in value:
                yield {"eval_status": f"Scoring: {value['stage']}…"}
            elif "queued" in value:
                yield {"eval_status": waiting(value)}
    except Cancelled:
        yield {"eval_status": "Cancelled."}
