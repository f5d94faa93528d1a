"""The web UI's work directory and its handlers, free of any web framework so they run headless.

Layout under one root (every name below it is generated here; no client path or name is ever used):

    references/<set>/images/000.png …   uploaded photos, checked and re-encoded as PNG; set.json
    identities/<name>.safetensors       identity files (imported or trained)
    videos/<name>.mp4 (+ .mp4.json)     generated clips with their run record

A `Workspace` keeps one loaded pipeline per `ModelSpec` and runs one model job at a time; a job
reports progress through a callback and stops at the next step once `cancel()` is called.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .video import read_sidecar, sidecar_path

REFERENCES, IDENTITIES, VIDEOS = "references", "identities", "videos"
SET_RECORD = "set.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,80}$")
_CLASS_WORD = re.compile(r"^[A-Za-z][A-Za-z \-]{0,39}$")


class Cancelled(Exception):
    """The user cancelled the running job."""


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be; checked on the bytes, never on the client's file name."""

    max_files: int = 20  # the design's 3–20 reference photos (§5.2 uses a handful per subject)
    max_bytes: int = 20 * 2**20  # per file
    max_pixels: int = 40_000_000  # per image; larger is a decompression bomb, not a photo
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")  # what `prepare` reads
    max_identity_bytes: int = 2**20  # an identity is K × 768 floats: a few KiB


def check_images(paths: list[str | Path], limits: UploadLimits = UploadLimits()) -> list:
    """Open uploaded photos as upright RGB PIL images after checking count, size and type by content."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    paths = [p for p in (paths or []) if p]
    if not paths:
        raise ValueError("photos: upload at least one photo of the subject")
    if len(paths) > limits.max_files:
        raise ValueError(f"photos: {len(paths)} files uploaded, at most {limits.max_files} allowed")
    images = []
    for i, path in enumerate(paths, 1):
        size = os.path.getsize(path)
        if size > limits.max_bytes:
            raise ValueError(f"photo {i}: {size / 2**20:.1f} MiB is over the {limits.max_bytes / 2**20:.0f} MiB limit")
        try:
            with Image.open(path) as im:
                if im.format not in limits.formats:
                    raise ValueError(f"photo {i}: {im.format or 'unknown'} content, expected {'/'.join(limits.formats)}")
                if im.width * im.height > limits.max_pixels:
                    raise ValueError(f"photo {i}: {im.width}×{im.height} pixels is over the {limits.max_pixels:,} pixel limit")
                im.verify()  # truncated or corrupt data raises here, before we decode it
            with Image.open(path) as im:
                upright = ImageOps.exif_transpose(im)
                upright.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
            raise ValueError(f"photo {i}: not a readable image ({type(e).__name__})") from None
        if upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P" and "transparency" in upright.info):
            rgba = upright.convert("RGBA")  # transparent parts become white, as `prepare` does
            upright = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        images.append(upright.convert("RGB"))
    return images


def check_class_word(word: str) -> str:
    word = (word or "").strip()
    if not _CLASS_WORD.match(word):
        raise ValueError(f"class word must be 1–40 letters such as 'dog' or 'woman', got {word!r}")
    return word


def new_name(prefix: str = "") -> str:
    """A fresh, sortable, unguessable name: `<prefix>20260101-120000-1a2b3c`."""
    return f"{prefix}{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _atomic_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def stream(work: Callable[[Callable[..., None]], Any], poll: float = 0.1) -> Iterator[tuple[str, Any]]:
    """Run `work(report)` in a thread and yield ("progress", payload) for each `report(payload)`, then ("done", result).

    `work`'s exception is re-raised here. The caller (a web handler) can update its page between events.
    """
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            events.put(("done", work(lambda payload: events.put(("progress", payload)))))
        except BaseException as e:  # handed to the consuming thread, which re-raises it
            events.put(("error", e))

    thread = threading.Thread(target=run, daemon=True, name="magicme-job")
    thread.start()
    while True:
        try:
            kind, value = events.get(timeout=poll)
        except queue.Empty:
            continue
        if kind == "error":
            raise value
        yield kind, value
        if kind == "done":
            return


@dataclass(eq=False)  # identity-hashed: one entry per running job
class _Job:
    cancel: threading.Event = field(default_factory=threading.Event)



def step_reporter(report: Callable[[dict], None], check: Callable[[], None], total: int | None = None):
    """A diffusers `callback_on_step_end` that reports the running step count and stops a cancelled job."""
    done = 0

    def on_step(pipe, step, timestep, kwargs):
        nonlocal done
        done += 1
        report({"step": done} if total is None else {"step": done, "steps": total})
        check()
        return kwargs

    return on_step

class Workspace:
    """One work directory, one model cache, one model job at a time."""

    def __init__(self, root: str | Path, device: str | None = None, limits: UploadLimits = UploadLimits()):
        self.root = Path(root).expanduser().resolve()
        self.device = device
        self.limits = limits
        for sub in (REFERENCES, IDENTITIES, VIDEOS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._pipes: dict = {}  # (ModelSpec, device) → [pipeline, {token: identity fingerprint}]
        self._scorers: dict = {}  # MetricModels → evaluate.Scorer
        self._segmenters: dict = {}  # SegmenterConfig → segment.Segmenter
        self._model_lock = threading.Lock()
        self._jobs: set[_Job] = set()
        self._jobs_lock = threading.Lock()

    # ---- names → paths: only names this workspace generated resolve, and only inside its folders
    def _resolve(self, sub: str, name: str, suffix: str = "") -> Path:
        if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".json"):
            raise ValueError(f"{sub[:-1]} {name!r} is not a name from this work directory")
        path = self.root / sub / (name if not suffix or name.endswith(suffix) else name + suffix)
        if path.parent != self.root / sub or not path.exists():
            raise FileNotFoundError(f"{sub[:-1]} {name!r} does not exist in {self.root / sub}")
        return path

    # ---- reference photos
    def save_references(self, paths: list[str | Path], class_word: str) -> str:
        """Check and store uploaded photos as a new reference set; return its name."""
        class_word = check_class_word(class_word)
        images = check_images(paths, self.limits)
        name = new_name("set-")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root / REFERENCES))
        try:
            (tmp / "images").mkdir()
            for i, im in enumerate(images):
                im.save(tmp / "images" / f"{i:03d}.png")
            record = {"class_word": class_word, "count": len(images), "created": _now()}
            (tmp / SET_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            os.chmod(tmp, 0o755)
            os.replace(tmp, self.root / REFERENCES / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    def reference_sets(self) -> list[str]:
        """Names of the stored reference sets, newest first."""
        folder = self.root / REFERENCES
        return sorted((p.name for p in folder.iterdir() if (p / SET_RECORD).is_file() and _NAME.match(p.name)), reverse=True)

    def reference_set(self, name: str) -> tuple[list[Path], dict]:
        """(image paths, set record) of one reference set."""
        folder = self._resolve(REFERENCES, name)
        return sorted((folder / "images").glob("*.png")), json.loads((folder / SET_RECORD).read_text())

    def prepare(self, name: str, segmenter: str = "auto") -> dict:
        """Square the set's photos around the subject and mask it (prepare.py, §4.2); return the manifest.

        The prepared set is kept in the set's `prepared/` folder; the segmenter is loaded once and reused.
        """
        from .prepare import PrepareConfig, prepare_identity_set, read_manifest
        from .segment import Segmenter, SegmenterConfig

        images, record = self.reference_set(name)
        seg_cfg = SegmenterConfig(method=segmenter, device=self.device)
        cfg = PrepareConfig(images=images[0].parent, class_word=record["class_word"], out=self.root / REFERENCES / name / "prepared", segmenter=seg_cfg)
        cfg.check()

        def work(check: Callable[[], None]) -> dict:
            if seg_cfg not in self._segmenters:
                self._segmenters[seg_cfg] = Segmenter(seg_cfg)
            check()
            return read_manifest(prepare_identity_set(cfg, segmenter=self._segmenters[seg_cfg]))

        return self.run_job(work)

    def prepared(self, name: str) -> Path | None:
        """The prepared folder of a set (images/, masks/, contact_sheet.png), or None before `prepare`."""
        folder = self._resolve(REFERENCES, name) / "prepared"
        return folder if (folder / "manifest.json").is_file() else None

    def train(self, name: str, cfg, report: Callable[[dict], None] = lambda _: None) -> str:
        """Train an identity on a prepared set (train.py, §4.2) into identities/; return the identity's name.

        `cfg` is a `TrainConfig` whose data, out and checkpoint folder are set here; `report` gets
        {"step", "steps", "loss"} after each optimizer step.
        """
        from .train import train

        data = self.prepared(name)
        if data is None:
            raise ValueError(f"reference set {name!r} is not prepared yet: make its masks first")
        _, record = self.reference_set(name)
        ident = f"{new_name(_slug(record['class_word']) + '-')}.safetensors"
        cfg = replace(cfg, data=data, out=self.root / IDENTITIES / ident, checkpoint_dir=self.root / "checkpoints" / Path(ident).stem)
        cfg.check()

        def work(check: Callable[[], None]) -> str:
            def on_step(step: int, loss: float) -> None:
                report({"step": step, "steps": cfg.steps, "loss": loss})
                check()

            train(cfg, quiet=True, device=self.device, step_callback=on_step)
            return ident

        return self.run_job(work)

    # ---- identities
    def import_identity(self, path: str | Path) -> str:
        """Store an uploaded identity .safetensors after checking its size and contents; return its name."""
        from .identity import read_identity_info

        if not path:
            raise ValueError("identity: upload an identity .safetensors file")
        size = os.path.getsize(path)
        if size > self.limits.max_identity_bytes:
            raise ValueError(f"identity: {size / 2**20:.1f} MiB is too large for an identity file (at most {self.limits.max_identity_bytes // 1024} KiB)")
        fd, tmp = tempfile.mkstemp(prefix=".import.", suffix=".safetensors", dir=self.root / IDENTITIES)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            try:
                info = read_identity_info(tmp)
            except ValueError:
                raise ValueError("identity: not a magicme identity file (a .safetensors from 'magicme train')") from None
            name = f"{new_name(_slug(info.class_word) + '-' if info.class_word else 'id-')}.safetensors"
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.root / IDENTITIES / name)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return name

    def identities(self) -> list[tuple[str, str]]:
        """(label, name) of every readable identity, newest first; the label shows its token and class word."""
        from .identity import read_identity_info

        out = []
        for p in sorted((self.root / IDENTITIES).glob("*.safetensors"), reverse=True):
            if not _NAME.match(p.name):
                continue
            try:
                info = read_identity_info(p)
            except (ValueError, FileNotFoundError):
                continue  # a foreign or damaged file is not offered
            out.append((f"{info.token} ({info.class_word or 'no class'}) — {p.name}", p.name))
        return out

    def identity_path(self, name: str) -> Path:
        return self._resolve(IDENTITIES, name, ".safetensors")

    # ---- videos
    def videos(self) -> list[str]:
        """Names of the generated videos that have a run record, newest first."""
        folder = self.root / VIDEOS
        return sorted(
            (p.name for p in folder.glob("*.mp4") if _NAME.match(p.name) and sidecar_path(p).is_file()),
            key=lambda n: (folder / n).stat().st_mtime,
            reverse=True,
        )

    def video_path(self, name: str) -> Path:
        return self._resolve(VIDEOS, name, ".mp4")

    def video_settings(self, name: str) -> dict:
        """The run record (sidecar) of a video: everything needed to reproduce it."""
        return read_sidecar(self.video_path(name))

    # ---- models
    def pipeline(self, spec, identities: list[Path] = ()):
        """The pipeline for `spec`, loaded once and reused, with `identities` loaded into it.

        An identity whose token is already loaded from a different file (retrained under the same
        token) forces a fresh pipeline, since a text encoder cannot unlearn a token.
        """
        from .identity import load_identities, read_identity_info
        from .models import fingerprint, load_pipeline

        spec.check()
        key = (spec, self.device)
        wanted = {read_identity_info(p).token: fingerprint(str(p)) for p in identities}
        entry = self._pipes.get(key)
        if entry is not None and any(entry[1].get(t, f) != f for t, f in wanted.items()):
            entry = None
        if entry is None:
            self._pipes.pop(key, None)
            entry = self._pipes[key] = [load_pipeline(spec, device=self.device), {}]
        load_identities(entry[0], list(identities))
        entry[1].update(wanted)
        return entry[0]

    # ---- jobs
    def run_job(self, work: Callable[[Callable[[], None]], Any]) -> Any:
        """Run `work(check)` holding the model lock; `check()` raises `Cancelled` after `cancel()`."""
        job = _Job()
        with self._jobs_lock:
            self._jobs.add(job)
        try:
            with self._model_lock:
                self._check(job)
                return work(lambda: self._check(job))
        finally:
            with self._jobs_lock:
                self._jobs.discard(job)

    @staticmethod
    def _check(job: _Job) -> None:
        if job.cancel.is_set():
            raise Cancelled("cancelled")

    def cancel(self) -> int:
        """Ask every running or waiting job to stop at its next step; return how many were asked."""
        with self._jobs_lock:
            for job in self._jobs:
                job.cancel.set()
            return len(self._jobs)

    # ---- stages
    def generate(self, cfg, report: Callable[[dict], None] = lambda _: None) -> str:
        """Generate one clip for `cfg` (one prompt, one seed; identities given by name) into videos/; return its name.

        `report` gets {"step", "steps"} after each denoising step (FreeInit runs the steps once per iteration).
        """
        from .generate import generate

        if len(cfg.prompts) > 1 or len(cfg.seeds) != 1:
            raise ValueError("the web UI makes one video per request: give one prompt and one seed")
        cfg = replace(cfg, identities=[str(self.identity_path(n)) for n in cfg.identities])
        cfg.check()
        total = cfg.resolved().steps * (cfg.free_init or 1)
        path = self.root / VIDEOS / f"{new_name('vid-')}.mp4"

        def work(check: Callable[[], None]) -> str:
            pipe = self.pipeline(cfg.models, [Path(p) for p in cfg.identities])
            generate(cfg, path, pipe=pipe, quiet=True, step_callback=step_reporter(report, check, total))
            return path.name

        return self.run_job(work)

    def refine(self, stage: str, video: str, cfg, report: Callable[[dict], None] = lambda _: None, detector=None) -> str:
        """Run Face VCD (stage "face") or Tiled VCD ("upscale", paper §4.3) on a stored video; return the new video's name.

        `cfg` is a `FaceConfig`/`UpscaleConfig` with identities given by name; `report` gets {"step"}
        after each denoising step (the count depends on faces and tiles found). `detector` overrides
        Face VCD's face detector (a callable, see face.py).
        """
        from .face import FaceConfig, face_vcd
        from .upscale import UpscaleConfig, tiled_vcd

        wanted = {"face": FaceConfig, "upscale": UpscaleConfig}.get(stage)
        if wanted is None or not isinstance(cfg, wanted):
            raise ValueError(f"stage must be 'face' with a FaceConfig or 'upscale' with an UpscaleConfig, got {stage!r}")
        source = self.video_path(video)
        cfg = replace(cfg, identities=[str(self.identity_path(n)) for n in cfg.identities])
        cfg.check()
        path = self.root / VIDEOS / f"{new_name('vid-')}.mp4"

        def work(check: Callable[[], None]) -> str:
            pipe = self.pipeline(cfg.models, [Path(p) for p in cfg.identities])
            on_step = step_reporter(report, check)
            if stage == "face":
                face_vcd(cfg, source, path, pipe=pipe, detector=detector, quiet=True, step_callback=on_step)
            else:
                tiled_vcd(cfg, source, path, pipe=pipe, quiet=True, step_callback=on_step)
            return path.name

        return self.run_job(work)

    def identity_names(self, settings: dict) -> list[str]:
        """The names (in this work directory) of the identities a video's run record used."""
        folder = self.root / IDENTITIES
        out = []
        for ident in settings.get("models", {}).get("identities", []):
            path = Path(ident.get("name", ""))
            if path.parent == folder and path.is_file():
                out.append(path.name)
        return out

    def evaluate(self, video: str, reference_set: str, metric_models, report: Callable[[dict], None] = lambda _: None) -> dict:
        """Score a stored video against a stored reference set with the paper's metrics (§5.2); keep the scores.

        The prompt and identity token come from the video's run record, the class word from the set.
        The metric models load once per `MetricModels` and are reused.
        """
        from .evaluate import Scorer, evaluate_video, resolve_face_score
        from .faces import is_person

        path = self.video_path(video)
        settings = self.video_settings(video)
        images, record = self.reference_set(reference_set)
        metric_models.check()
        ids = settings.get("models", {}).get("identities", [])
        token = ids[0]["token"] if ids else None

        def work(check: Callable[[], None]) -> dict:
            if metric_models not in self._scorers:
                report({"stage": "loading the metric models"})
                # face identity for people when the [faces] extra is installed (one Scorer serves every set)
                face, people_only = resolve_face_score("auto", people=is_person(record["class_word"]))
                self._scorers[metric_models] = Scorer(metric_models, device=self.device, face=face, face_people_only=people_only)
            check()
            report({"stage": "scoring"})
            row = evaluate_video(path, images[0].parent, video_prompt(settings), token=token,
                                 class_word=record["class_word"], scorer=self._scorers[metric_models])
            scores = {"video": video, "reference_set": reference_set, "metric_models": asdict(metric_models), **row}
            _atomic_json(self.metrics_path(video), scores)
            return scores

        return self.run_job(work)

    def metrics_path(self, video: str) -> Path:
        return self.video_path(video).with_name(f"{self.video_path(video).name}.metrics.json")

    def metrics(self, video: str) -> dict | None:
        """The last scores of a video, or None if it was never scored."""
        path = self.metrics_path(video)
        return json.loads(path.read_text()) if path.is_file() else None


def video_prompt(settings: dict) -> str:
    """The prompt a video was made with; a prompt-travel clip's is its frame-0 prompt."""
    return settings.get("prompt") or (settings.get("prompt_at") or {}).get("0", "")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:24] or "id"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
