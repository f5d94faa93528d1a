"""The web UI's storage: what each user made, in folders the UI owns, free of any web framework.

`Workspaces` owns one folder of the UI's work directory, `<workdir>/workspaces/`, which it made and
marked itself: the web server serves nothing else. Inside it, one `Workspace` per browser (or per login
with --auth, or one `shared/` for everyone with --shared) holds what that user made; every name below is
generated here, no client path or name is ever used as one:

    references/<set>/images/000.png …   uploaded photos, checked and re-encoded as PNG; set.json
    references/<set>/masks/000.png …    the user's own masks, when uploaded
    references/<set>/prepared/          the prepared set (prepare.py): square images, masks, manifest
    identities/<name>.safetensors       identity files (imported or trained)
    loras/<name>.safetensors            uploaded LoRAs and motion LoRAs, re-saved as .safetensors
    checkpoints/<identity>/step-…/      training checkpoints with their preview frames
    videos/<name>.mp4 (+ .mp4.json)     clips with their run record (+ .mp4.metrics.json once scored)
    thumbnails/<name>.png               one frame of each clip, for the gallery

All workspaces share one `Runner` (runner.py): the loaded models and the queue of model jobs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .runner import Job, Runner, identities_loaded, latent_preview, step_reporter, unusable_models
from .video import read_sidecar, sidecar_path

REFERENCES, IDENTITIES, VIDEOS, CHECKPOINTS, THUMBNAILS = "references", "identities", "videos", "checkpoints", "thumbnails"
LORAS = "loras"
SET_RECORD = "set.json"
WORKSPACES = "workspaces"
MARK = ".magicme-ui"  # the UI made this folder: it may serve and replace what is inside
SHARED = "shared"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,80}$")
_CLASS_WORD = re.compile(r"^[A-Za-z][A-Za-z \-]{0,39}$")
_WORKSPACE_ID = re.compile(r"^(shared|[bu]-[0-9a-f]{24})$")
_BROWSER_KEY = re.compile(r"^[A-Za-z0-9_\-]{32,64}$")
MASK_SUFFIXES = ("", "_mask", "-mask", ".mask", " mask")  # 'dog1.png' or 'dog1_mask.png' is the mask of 'dog1.jpg'


@dataclass(frozen=True)
class UploadLimits:
    """What an upload may be; checked on the bytes, never on the client's file name."""

    max_files: int = 20  # the design's 3–20 reference photos (§5.2 uses a handful per subject)
    max_bytes: int = 20 * 2**20  # per file
    max_pixels: int = 40_000_000  # per image; larger is a decompression bomb, not a photo
    min_side: int = 16  # smaller is no photo of a subject (and breaks GrabCut)
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")  # what `prepare` reads
    max_identity_bytes: int = 2**20  # ID tokens are K × 768 floats (Wan: K × 4096): a few KiB; a Wan LoRA identity: max_lora_bytes
    max_lora_bytes: int = 2**30  # SD-1.5 LoRAs are 10–300 MB, AnimateDiff's motion LoRAs 77 MB


def display_name(path: str | Path) -> str:
    """An uploaded file's name as the user knows it, for messages only (never used as a path)."""
    name = re.sub(r"[^\w .()\-]", "_", Path(str(path)).name)[:60]
    return name or "unnamed file"


def read_photo(path: str | Path, limits: UploadLimits = UploadLimits()):
    """One uploaded photo as an upright RGB PIL image, checked by its bytes; ValueError says why not."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    size = os.path.getsize(path)
    if size > limits.max_bytes:
        raise ValueError(f"{size / 2**20:.1f} MiB is over the {limits.max_bytes / 2**20:.0f} MiB limit")
    try:
        with Image.open(path) as im:
            if im.format not in limits.formats:
                raise ValueError(f"{im.format or 'unknown'} content, expected {'/'.join(limits.formats)}")
            if im.width * im.height > limits.max_pixels:
                raise ValueError(f"{im.width}×{im.height} pixels is over the {limits.max_pixels:,} pixel limit")
            if min(im.size) < limits.min_side:
                raise ValueError(f"{im.width}×{im.height} pixels is too small (at least {limits.min_side} a side)")
            im.verify()  # truncated or corrupt data raises here, before we decode it
        with Image.open(path) as im:
            upright = ImageOps.exif_transpose(im)
            upright.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__})") from None
    if upright.mode in ("RGBA", "LA", "PA") or (upright.mode == "P" and "transparency" in upright.info):
        rgba = upright.convert("RGBA")  # transparent parts become white, as `prepare` does
        upright = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return upright.convert("RGB")


def read_photos(paths: list[str | Path], limits: UploadLimits = UploadLimits()) -> tuple[list, list[str], list[str]]:
    """Uploaded photos → (images, their names, "name: why" per skipped file); an unreadable photo is skipped, as the CLI does."""
    paths = [p for p in (paths or []) if p]
    if not paths:
        raise ValueError("photos: upload at least one photo of the subject")
    if len(paths) > limits.max_files:
        raise ValueError(f"photos: {len(paths)} files uploaded, at most {limits.max_files} allowed")
    images, names, skipped = [], [], []
    for path in paths:
        try:
            images.append(read_photo(path, limits))
            names.append(display_name(path))
        except ValueError as e:
            skipped.append(f"{display_name(path)}: {e}")
    if not images:
        raise ValueError(f"photos: none of the {len(paths)} file(s) is a usable photo ({'; '.join(skipped)})")
    return images, names, skipped


def check_class_word(word: str) -> str:
    word = (word or "").strip()
    if not _CLASS_WORD.match(word):
        raise ValueError(f"class word must be 1–40 letters such as 'dog' or 'woman', got {word!r}")
    return word


def new_name(prefix: str = "") -> str:
    """A fresh, sortable, unguessable name: `<prefix>20260101-120000-1a2b3c`."""
    return f"{prefix}{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def video_name(prompt: str, seed: int) -> str:
    """A clip's file name that says what it is: `a-v-dog-running-s3-20260101-120000-1a2b3c.mp4`."""
    return new_name(f"{_slug(prompt, 32, empty='clip')}-s{seed}-") + ".mp4"  # at most 80 characters: a name `_NAME` accepts


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _atomic_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _replace_folder(tmp: Path, dest: Path) -> None:
    """Put folder `tmp` at `dest` (a folder this workspace wrote): rename the old aside first, so a kill leaves one whole."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(3)}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- the work directory


def claim_folder(folder: Path) -> Path:
    """Create `folder` and mark it as the UI's, or accept it if marked (or empty); refuse a folder someone else filled."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--work-dir: {str(folder)!r} is a file, not a folder")
    if folder.is_dir() and not (folder / MARK).is_file() and any(folder.iterdir()):
        raise FileExistsError(f"--work-dir: {str(folder)!r} exists and was not made by magicme ui; name another --work-dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MARK).touch()
    except (FileExistsError, NotADirectoryError):
        raise FileExistsError(f"--work-dir: {str(folder.parent)!r} is not a folder") from None
    except PermissionError:
        raise ValueError(f"--work-dir: {str(folder.parent)!r} is not writable") from None
    return folder


class Workspaces:
    """The UI's own folder `<workdir>/workspaces/` and one workspace per browser, login, or shared."""

    def __init__(self, workdir: str | Path, device: str | None = None, limits: UploadLimits = UploadLimits()):
        self.workdir = Path(workdir).expanduser().resolve()
        self.root = claim_folder(self.workdir / WORKSPACES)
        self.runner = Runner(device)
        self.limits = limits
        self._open: dict[str, Workspace] = {}
        self._lock = threading.Lock()

    def get(self, wid: str) -> "Workspace":
        if not isinstance(wid, str) or not _WORKSPACE_ID.match(wid):
            raise ValueError("this page has no workspace yet: reload the page")
        with self._lock:
            if wid not in self._open:
                self._open[wid] = Workspace(self.root / wid, limits=self.limits, runner=self.runner, wid=wid)
            return self._open[wid]

    @staticmethod
    def for_browser(key: str | None) -> tuple[str, str]:
        """(browser key, workspace id): the key a browser keeps (a fresh one if it has none) and the folder it opens.

        The key is a 192-bit secret only that browser holds; the folder is named by its hash, so
        neither the folder name nor anything served reveals it.
        """
        if not isinstance(key, str) or not _BROWSER_KEY.match(key):
            key = secrets.token_urlsafe(24)
        return key, "b-" + hashlib.sha256(f"browser:{key}".encode()).hexdigest()[:24]

    @staticmethod
    def for_user(name: str) -> str:
        """The workspace id of a login (--auth): the same from every browser."""
        return "u-" + hashlib.sha256(f"user:{name}".encode()).hexdigest()[:24]


class Workspace:
    """What one user made: photos, identities, videos; its model jobs run on the shared `Runner`."""

    def __init__(self, root: str | Path, device: str | None = None, limits: UploadLimits = UploadLimits(),
                 runner: Runner | None = None, wid: str = SHARED):
        self.root = Path(root).expanduser().resolve()
        self.runner = runner or Runner(device)
        self.device = self.runner.device
        self.limits = limits
        self.id = wid
        for sub in (REFERENCES, IDENTITIES, VIDEOS, THUMBNAILS, LORAS):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- names → paths: only names this workspace generated resolve, and only inside its folders
    def _resolve(self, sub: str, name: str, suffix: str = "") -> Path:
        what = {REFERENCES: "reference set", IDENTITIES: "identity", VIDEOS: "video", LORAS: "LoRA"}[sub]
        if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".json"):
            raise ValueError(f"{what} {name!r} is not a name from this workspace")
        path = self.root / sub / (name if not suffix or name.endswith(suffix) else name + suffix)
        if path.parent != self.root / sub or not path.exists():
            raise FileNotFoundError(f"{what} {name!r} is not in this workspace (any more)")
        return path

    def relative(self, text: str) -> str:
        """`text` with this workspace's folder left out of any path in it (messages name files, not server folders)."""
        return text.replace(f"{self.root}{os.sep}", "")

    # ---- jobs
    def new_job(self, kind: str = "job") -> Job:
        return self.runner.new_job(self.id, kind)

    def run_job(self, work: Callable[[Callable[[], None]], Any], report: Callable[[dict], None] = lambda _: None,
                job: Job | None = None) -> Any:
        """Run `work(check)` when the queue gets to it; `check()` raises `Cancelled` once the job is cancelled."""
        return self.runner.run(job or self.new_job(), work, report)

    def cancel(self, job_id: str | None = None) -> int:
        """Cancel this workspace's job `job_id` (every one of its jobs without an id); return how many were asked."""
        return self.runner.cancel(self.id, job_id)

    @contextmanager
    def _job(self, job: Job | None):
        """A job for one request: made here if the caller has none, forgotten if the request fails before it queues."""
        job = job or self.new_job()
        try:
            yield job
        except BaseException:
            self.runner.forget(job)
            raise

    # ---- reference photos
    def save_references(self, paths: list[str | Path], class_word: str) -> tuple[str, list[str]]:
        """Check and store uploaded photos as a new reference set; return (its name, "file: why" per photo skipped)."""
        class_word = check_class_word(class_word)
        images, names, skipped = read_photos(paths, self.limits)
        name = new_name("set-")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root / REFERENCES))
        try:
            (tmp / "images").mkdir()
            for i, im in enumerate(images):
                im.save(tmp / "images" / f"{i:03d}.png")
            record = {"class_word": class_word, "count": len(images), "names": names, "skipped": skipped, "created": _now()}
            (tmp / SET_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            os.chmod(tmp, 0o755)
            os.replace(tmp, self.root / REFERENCES / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name, skipped

    def reference_sets(self) -> list[str]:
        """Names of the stored reference sets, newest first."""
        folder = self.root / REFERENCES
        return sorted((p.name for p in folder.iterdir() if (p / SET_RECORD).is_file() and _NAME.match(p.name)), reverse=True)

    def reference_set(self, name: str) -> tuple[list[Path], dict]:
        """(image paths, set record) of one reference set."""
        folder = self._resolve(REFERENCES, name)
        return sorted((folder / "images").glob("*.png")), json.loads((folder / SET_RECORD).read_text())

    def save_masks(self, name: str, paths: list[str | Path]) -> Path:
        """Store the user's masks of a set, matched to its photos by file name ('dog1.png' or 'dog1_mask.png' for 'dog1.jpg')."""
        from PIL import Image

        from .segment import read_user_mask

        images, record = self.reference_set(name)
        names = record.get("names") or [p.name for p in images]
        by_stem = {}
        for path in paths:
            stem = Path(display_name(path)).stem
            match = next((i for i, n in enumerate(names) for s in MASK_SUFFIXES if Path(n).stem + s == stem), None)
            if match is None:
                raise ValueError(f"mask {display_name(path)!r} matches no photo of the set (name it after its photo, e.g. {Path(names[0]).stem + '.png'!r})")
            by_stem[match] = path
        missing = [names[i] for i in range(len(images)) if i not in by_stem]
        if missing:
            raise ValueError(f"masks: none for photo {missing[0]!r} (give every photo a mask, e.g. {Path(missing[0]).stem + '_mask.png'!r}, or none)")
        folder = self._resolve(REFERENCES, name)
        tmp = Path(tempfile.mkdtemp(prefix=".masks.", dir=folder))
        try:
            for i, path in sorted(by_stem.items()):
                with Image.open(images[i]) as photo:
                    size = photo.size
                try:
                    read_photo(path, replace(self.limits, formats=(*self.limits.formats, "BMP")))  # size and type, as for photos
                    mask = read_user_mask(path, size)
                except ValueError as e:  # name the mask as the user knows it, not by its upload path
                    text, shown = str(e), repr(display_name(path))
                    text = text.replace(repr(str(path)), shown).replace("--masks: ", "mask ") if repr(str(path)) in text else f"mask {shown}: {text}"
                    raise ValueError(text) from None
                Image.fromarray(mask.astype("uint8") * 255).save(tmp / f"{i:03d}.png")
            os.chmod(tmp, 0o755)
            _replace_folder(tmp, folder / "masks")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder / "masks"

    def prepare(self, name: str, segmenter: str = "auto", user_masks: bool = False, report=lambda _: None, job: Job | None = None) -> dict:
        """Square the set's photos around the subject and mask it (prepare.py, §4.2); return the manifest.

        `user_masks`: take the masks stored by `save_masks` instead of segmenting. The prepared set
        is kept in the set's `prepared/` folder; the segmenter is loaded once and reused.
        """
        from .prepare import PrepareConfig, prepare_identity_set, read_manifest
        from .segment import SegmenterConfig

        with self._job(job) as job:
            images, record = self.reference_set(name)
            folder = self.root / REFERENCES / name
            seg_cfg = SegmenterConfig(method=segmenter, device=self.device)
            cfg = PrepareConfig(images=images[0].parent, class_word=record["class_word"], out=folder / "prepared",
                                masks=folder / "masks" if user_masks else None, segmenter=seg_cfg)
            cfg.check()

        def work(check: Callable[[], None]) -> dict:
            seg = None if user_masks else self.runner.segmenter(seg_cfg)
            check()
            return read_manifest(prepare_identity_set(cfg, segmenter=seg))

        return self.run_job(work, report, job)

    def prepared(self, name: str) -> Path | None:
        """The prepared folder of a set (images/, masks/, contact_sheet.png), or None before `prepare`."""
        folder = self._resolve(REFERENCES, name) / "prepared"
        return folder if (folder / "manifest.json").is_file() else None

    def mask(self, name: str, index: int):
        """(prepared photo as PIL, its mask as (H, W) bool) of photo `index` of a prepared set."""
        import numpy as np
        from PIL import Image

        from .prepare import read_manifest

        folder = self.prepared(name)
        if folder is None:
            raise ValueError(f"reference set {name!r} has no masks yet: make them first")
        items = read_manifest(folder)["items"]
        if not isinstance(index, int) or not 0 <= index < len(items):
            raise ValueError(f"mask: pick one of the {len(items)} masks first")
        image = Image.open(folder / items[index]["image"]).convert("RGB")
        return image, np.asarray(Image.open(folder / items[index]["mask"]).convert("L")) > 127

    def set_mask(self, name: str, index: int, mask) -> dict:
        """Replace the prepared mask of photo `index` (a bool array, True on the subject) with the user's; return the manifest."""
        import numpy as np
        from PIL import Image

        from .prepare import MANIFEST, contact_sheet, read_manifest

        image, _ = self.mask(name, index)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.size[::-1]:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(image.size, Image.NEAREST)) > 127
        if not mask.any():
            raise ValueError("mask: it is empty; paint the subject")
        folder = self.prepared(name)
        manifest = read_manifest(folder)
        item = manifest["items"][index]
        _atomic_write(folder / item["mask"], lambda tmp: Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG"))
        item.update(mask_method="user", mask_area=float(mask.mean()), note="painted in the web UI")
        images, masks = zip(*(self.mask(name, i) for i in range(len(manifest["items"]))))
        _atomic_write(folder / "contact_sheet.png", lambda tmp: contact_sheet(list(images), list(masks)).save(tmp, format="PNG"))
        _atomic_json(folder / MANIFEST, manifest)
        return manifest

    def train(self, name: str, cfg, report: Callable[[dict], None] = lambda _: None, job: Job | None = None) -> str:
        """Train an identity on a prepared set (train.py, §4.2) into identities/; return the identity's name.

        `cfg` is a `TrainConfig` whose data, out and checkpoint folder are set here; `report` gets
        {"step", "steps", "loss"} after each optimizer step and {"checkpoint": step, "preview": frames.png}
        for each checkpoint (every `cfg.checkpoint_every` steps) as it appears.
        """
        from .train import train

        with self._job(job) as job:
            data = self.prepared(name)
            if data is None:
                raise ValueError(f"reference set {name!r} has no masks yet: make them first")
            _, record = self.reference_set(name)
            ident = f"{new_name(_slug(record['class_word']) + '-')}.safetensors"
            checkpoints = self.root / CHECKPOINTS / Path(ident).stem
            cfg = replace(cfg, data=data, out=self.root / IDENTITIES / ident, checkpoint_dir=checkpoints)
            with unusable_models():
                cfg.check()

        def work(check: Callable[[], None]) -> str:
            shown: set[Path] = set()

            def new_checkpoints() -> None:  # train() writes them after its step callback: look for them each step
                for folder in sorted(checkpoints.glob("step-*")) if checkpoints.is_dir() else []:
                    if folder not in shown and (folder / "validation.png").is_file():
                        shown.add(folder)
                        report({"checkpoint": int(folder.name.split("-")[1]), "preview": str(folder / "validation.png")})

            def on_step(step: int, loss: float) -> None:
                new_checkpoints()
                report({"step": step, "steps": cfg.steps, "loss": loss})
                check()

            with unusable_models():
                train(cfg, quiet=True, device=self.device, step_callback=on_step)
            new_checkpoints()
            return ident

        return self.run_job(work, report, job)

    # ---- identities
    def import_identity(self, path: str | Path) -> str:
        """Store an uploaded identity .safetensors after checking its size and contents; return its name."""
        from .identity import read_identity_info

        if not path:
            raise ValueError("identity: upload an identity .safetensors file")
        size = os.path.getsize(path)
        if size > max(self.limits.max_identity_bytes, self.limits.max_lora_bytes):
            raise ValueError(f"identity: {size / 2**20:.1f} MiB is too large for an identity file")
        fd, tmp = tempfile.mkstemp(prefix=".import.", suffix=".safetensors", dir=self.root / IDENTITIES)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            try:
                info = read_identity_info(tmp)
            except ValueError:
                raise ValueError(f"identity {display_name(path)!r}: not a magicme identity file (a .safetensors from 'magicme train')") from None
            if info.form != "lora" and size > self.limits.max_identity_bytes:  # only a Wan LoRA identity is LoRA-sized
                raise ValueError(f"identity: {size / 2**20:.1f} MiB is too large for an identity file (at most {self.limits.max_identity_bytes // 1024} KiB)")
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
            kind = "" if info.backbone == "animatediff" else f" · Wan {'LoRA' if info.form == 'lora' else 'tokens'}"
            out.append((f"{info.token} ({info.class_word or 'no class'}{kind}) — {p.name}", p.name))
        return out

    def identity_path(self, name: str) -> Path:
        return self._resolve(IDENTITIES, name, ".safetensors")

    def identity_names(self, settings: dict) -> list[str]:
        """The names (in this workspace) of the identities a video's run record used."""
        folder = self.root / IDENTITIES
        out = []
        for ident in settings.get("models", {}).get("identities", []):
            path = Path(ident.get("name", ""))
            if path.parent == folder and path.is_file():
                out.append(path.name)
        return out

    # ---- LoRAs
    def import_lora(self, path: str | Path, motion: bool = False) -> str:
        """Store an uploaded LoRA (motion LoRA) after reading it safely and checking its kind; return its name.

        The tensors are re-saved as .safetensors, so a pickled `.ckpt` upload is never kept as a pickle.
        """
        from .lora import read_lora
        from .weights import read_weights, tensors, write_safetensors

        what = "motion LoRA" if motion else "LoRA"
        if not path:
            raise ValueError(f"{what}: upload a .safetensors or .ckpt file")
        shown = display_name(path)
        size = os.path.getsize(path)
        if size > self.limits.max_lora_bytes:
            raise ValueError(f"{what} {shown!r}: {size / 2**20:.0f} MiB is over the {self.limits.max_lora_bytes // 2**20} MiB limit")
        try:
            read_lora(str(path), motion)  # the kind the field asks for, read without running any pickle
            state = tensors(read_weights(path, what))
        except (ValueError, FileNotFoundError) as e:
            text = str(e).replace(repr(str(path)), repr(shown))
            raise ValueError(text.replace("pass it with --motion-lora", "upload it under Motion LoRAs")
                             .replace("pass it with --lora", "upload it under LoRAs")) from None
        name = f"{_slug(Path(shown).stem, 32, empty='lora')}-{secrets.token_hex(3)}.safetensors"
        write_safetensors(self.root / LORAS / name, state, {"kind": "motion_lora" if motion else "lora"})
        return name

    def loras(self) -> list[str]:
        """Names of the stored LoRAs and motion LoRAs, newest first."""
        folder = self.root / LORAS
        return sorted((p.name for p in folder.glob("*.safetensors") if _NAME.match(p.name)),
                      key=lambda n: (folder / n).stat().st_mtime, reverse=True)

    def lora_path(self, name: str) -> Path:
        return self._resolve(LORAS, name, ".safetensors")

    def lora_name(self, path: str) -> str | None:
        """The workspace name of a LoRA a run record names by path, if it is one of this workspace's."""
        p = Path(path)
        return p.name if p.parent == self.root / LORAS and p.is_file() else None

    # ---- videos
    def videos(self) -> list[str]:
        """Names of the clips that have a run record, newest first."""
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

    def video_source(self, name: str) -> str | None:
        """The workspace video a refined clip was made from, if it is still here."""
        path = Path(self.video_settings(name).get("input", {}).get("path", ""))
        return path.name if path.parent == self.root / VIDEOS and path.is_file() else None

    def thumbnail(self, name: str) -> Path:
        """A PNG of the clip's middle frame, made once."""
        from PIL import Image

        from .video import read_video

        video = self.video_path(name)
        thumb = self.root / THUMBNAILS / f"{video.stem}.png"
        if not thumb.is_file() or thumb.stat().st_mtime < video.stat().st_mtime:
            frames = read_video(video)
            _atomic_write(thumb, lambda tmp: Image.fromarray(frames[len(frames) // 2]).save(tmp, format="PNG"))
        return thumb

    # ---- stages
    def generate(self, cfg, report: Callable[[dict], None] = lambda _: None, job: Job | None = None,
                 preview_every: int = 0) -> list[str]:
        """Generate one clip per seed of `cfg` (one prompt; identities given by name) into videos/; return their names.

        `report` gets {"step", "steps", "clip", "clips"} after each denoising step (FreeInit runs the
        steps once per iteration), with "preview" (frames decoded from the latents) every
        `preview_every` steps, and {"clip_done": name} after each clip. A cancelled job keeps the
        clips already finished.
        """
        from .generate import generate

        with self._job(job) as job:
            if len(cfg.prompts) > 1:
                raise ValueError("the web UI makes one prompt per request")
            cfg = replace(cfg, identities=[str(self.identity_path(n)) for n in cfg.identities])
            with unusable_models():
                wan = cfg.models.resolved_backbone() == "wan"
                if wan:
                    from .wan_generate import check_wan_request

                    check_wan_request(cfg)  # before the job queues: the AnimateDiff-only fields are refused here
                cfg.check()
                check_backbones(cfg.models, cfg.identities)
            if wan:
                from .wan_generate import wan_schedule

                total = wan_schedule(cfg)[0]
            else:
                total = cfg.resolved().steps * (cfg.free_init or 1)
            prompt = cfg.prompts[0] if cfg.prompts else cfg.prompt_at.get(0, "")

        def work(check: Callable[[], None]) -> list[str]:
            pipe = self.runner.pipeline(cfg.models)
            names = []
            with identities_loaded(pipe, [Path(p) for p in cfg.identities]):
                for i, seed in enumerate(cfg.seeds):
                    path = self.root / VIDEOS / video_name(prompt, seed)
                    on_step = step_reporter(report, check, total, {"clip": i + 1, "clips": len(cfg.seeds)},
                                            latent_preview, preview_every)
                    generate(replace(cfg, seeds=[seed]), path, pipe=pipe, quiet=True, step_callback=on_step)
                    names.append(path.name)
                    self.thumbnail(path.name)
                    report({"clip_done": path.name, "clip": i + 1, "clips": len(cfg.seeds)})
            return names

        return self.run_job(work, report, job)

    def refine(self, stage: str, video: str, cfg, report: Callable[[dict], None] = lambda _: None, detector=None,
               job: Job | None = None) -> str:
        """Run Face VCD (stage "face") or Tiled VCD ("upscale", paper §4.3) on a stored video; return the new video's name.

        `cfg` is a `FaceConfig`/`UpscaleConfig` with identities given by name; `report` gets {"step"}
        after each denoising step (the count depends on faces and tiles found). `detector` overrides
        Face VCD's face detector (a callable, see face.py).
        """
        from .face import FaceConfig, face_vcd
        from .upscale import UpscaleConfig, tiled_vcd

        with self._job(job) as job:
            wanted = {"face": FaceConfig, "upscale": UpscaleConfig}.get(stage)
            if wanted is None or not isinstance(cfg, wanted):
                raise ValueError(f"stage must be 'face' with a FaceConfig or 'upscale' with an UpscaleConfig, got {stage!r}")
            source = self.video_path(video)
            cfg = replace(cfg, identities=[str(self.identity_path(n)) for n in cfg.identities])
            with unusable_models():
                cfg.check()
                check_backbones(cfg.models, cfg.identities)
            path = self.root / VIDEOS / video_name(f"{stage} {cfg.prompt}", cfg.seed)

        def work(check: Callable[[], None]) -> str:
            pipe = self.runner.pipeline(cfg.models)
            on_step = step_reporter(report, check)
            with identities_loaded(pipe, [Path(p) for p in cfg.identities]):
                if stage == "face":
                    face_vcd(cfg, source, path, pipe=pipe, detector=detector, quiet=True, step_callback=on_step)
                else:
                    tiled_vcd(cfg, source, path, pipe=pipe, quiet=True, step_callback=on_step)
            self.thumbnail(path.name)
            return path.name

        return self.run_job(work, report, job)

    def evaluate(self, video: str, reference_set: str, metric_models, report: Callable[[dict], None] = lambda _: None,
                 job: Job | None = None) -> dict:
        """Score a stored video against a stored reference set with the paper's metrics (§5.2); keep the scores.

        The prompt and identity token come from the video's run record, the class word from the set.
        The metric models load once per `MetricModels` and are reused.
        """
        from .evaluate import evaluate_video
        from .faces import is_person

        with self._job(job) as job:
            path = self.video_path(video)
            settings = self.video_settings(video)
            images, record = self.reference_set(reference_set)
            metric_models.check()
            ids = settings.get("models", {}).get("identities", [])
            token = ids[0]["token"] if ids else None

        def work(check: Callable[[], None]) -> dict:
            report({"stage": "loading the metric models"})
            # face identity for people when the [faces] extra is installed
            scorer = self.runner.scorer(metric_models, people=is_person(record["class_word"]))
            check()
            report({"stage": "scoring"})
            row = evaluate_video(path, images[0].parent, video_prompt(settings), token=token,
                                 class_word=record["class_word"], scorer=scorer)
            scores = {"video": video, "reference_set": reference_set, "metric_models": asdict(metric_models), **row}
            _atomic_json(self.metrics_path(video), scores)
            return scores

        return self.run_job(work, report, job)

    def metrics_path(self, video: str) -> Path:
        return self.video_path(video).with_name(f"{self.video_path(video).name}.metrics.json")

    def metrics(self, video: str) -> dict | None:
        """The last scores of a video, or None if it was never scored."""
        path = self.metrics_path(video)
        return json.loads(path.read_text()) if path.is_file() else None


def check_backbones(models, identities: list[str]) -> None:
    """Refuse, before a job queues, an identity trained for the other backbone than the model's (one line naming it)."""
    from .identity import check_identity_backbone, read_identity_info

    backbone = models.resolved_backbone()
    for path in identities:
        check_identity_backbone(path, read_identity_info(path), backbone)


def video_prompt(settings: dict) -> str:
    """The prompt a video was made with; a prompt-travel clip's is its frame-0 prompt."""
    return settings.get("prompt") or (settings.get("prompt_at") or {}).get("0", "")


def _slug(text: str, length: int = 24, empty: str = "id") -> str:
    return re.sub(r"[^a-z0-9]+", "-", (text or "").lower()).strip("-")[:length].strip("-") or empty


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

