"""The evaluation protocol (paper §5.2, Tables 1–2): subjects × prompts × seeds → generate → score.

A subjects file (YAML) names each subject's identity file, reference folder, class word and
prompts, plus the generation and metric settings. Every video becomes one JSON line in a results
file, written as soon as it is scored, so an interrupted suite resumes where it stopped. Under
`accelerate launch` the jobs are split across processes; each appends to its own part file and
the main process merges them at the end (deduplicated by job, so no row is lost or repeated).

Ablations (Table 2): `gamma: 0` is "w/o 3D Gaussian noise prior"; "w/o prompt-to-segmentation"
is a subject whose identity was trained without the mask (its file's `masked` metadata, copied
into every row). Baselines without an ID module (Table 1's "SD", "Realistic Vision"): a subject with
`identity: none` and plain class-word prompts, in a results file of its own `base`.

Backbones: `backbone: wan` runs the whole suite on Wan 2.x. A `backbones:` table (name → model settings, e.g.
`animatediff: {base: ...}` and `wan: {backbone: wan, base: ...}`) runs the same subjects, prompts and seeds on
each, one results file per entry (`results.<name>.jsonl`), compared in one report; a subject's `identity` is
then a mapping name → file (identities are backbone-specific).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

from .checks import safe_name
from .evaluate import FACE_SCORES, MetricModels, face_score_config, load_reference_images
from .faces import missing_packages
from .identity import IdentityInfo, check_prompt_tokens, read_identity_info
from .models import ModelSpec, fingerprint
from .outputs import write_text
from .records import check_value
from .speed import SpeedOptions

log = logging.getLogger(__name__)

PAPER_SEEDS = (0, 1, 2, 3)  # §5.2: four videos per prompt
VIDEO_FORMATS = ("mp4", "gif")


@dataclass(frozen=True)
class Subject:
    """One subject of the protocol: its identity file, reference photos, class word and prompts.

    `identity` None is the no-ID-module baseline: prompts are used as written, with the class word.
    """

    name: str
    identity: Path | None
    references: Path
    prompts: tuple[str, ...]
    class_word: str = ""  # "": the identity file's

    def info(self) -> IdentityInfo | None:
        return read_identity_info(self.identity) if self.identity is not None else None


@dataclass
class SuiteConfig:
    """The whole protocol; the subjects file, the CLI and the Python API share these fields."""

    subjects: list[Subject]
    seeds: list[int] = field(default_factory=lambda: list(PAPER_SEEDS))  # §5.2
    frames: int = 16
    steps: int = 25
    guidance: float = 7.5
    gamma: float = 0.15  # §5.2; 0 = the "w/o 3D Gaussian noise prior" ablation (Table 2)
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    models: ModelSpec = field(default_factory=ModelSpec)
    metrics: MetricModels = field(default_factory=MetricModels)
    face_score: str = "auto"  # face identity: auto = dlib's descriptor for people, when installed; on; off
    face_model: str | None = None  # SFace .onnx (cv2.FaceRecognizerSF)
    face_detector: str | None = None  # YuNet .onnx (cv2.FaceDetectorYN)
    video_format: str = "mp4"

    def generate_config(self, subject: Subject):
        from .generate import GenerateConfig

        return GenerateConfig(
            prompts=list(subject.prompts), negative_prompt=self.negative_prompt, seeds=list(self.seeds),
            frames=self.frames, height=self.height, width=self.width, steps=self.steps, guidance=self.guidance,
            gamma=self.gamma, identities=[str(subject.identity)] if subject.identity else [], models=self.models,
        )

    def check(self) -> None:
        """Validate everything before any model work: ValueError/FileNotFoundError naming the subject and field."""
        if not self.subjects:
            raise ValueError("--subjects: the subjects file lists no subjects")
        names = [s.name for s in self.subjects]
        if len(set(names)) != len(names):
            raise ValueError(f"--subjects: subject names must be unique, got {names}")
        if self.video_format not in VIDEO_FORMATS:
            raise ValueError(f"video_format must be one of {', '.join(VIDEO_FORMATS)}, got {self.video_format!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seed values must be distinct, got {self.seeds}")
        if self.face_score not in FACE_SCORES:
            raise ValueError(f"--face-score must be one of {', '.join(FACE_SCORES)}, got {self.face_score!r}")
        if self.face_score == "on" and self.face_model is None and missing_packages():
            raise ValueError(f"--face-score on needs dlib's face models: {missing_packages()}")
        if (self.face_model is None) != (self.face_detector is None):
            raise ValueError("--face-model and --face-detector go together (SFace recogniser + YuNet detector .onnx)")
        for arg, path in (("--face-model", self.face_model), ("--face-detector", self.face_detector)):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{arg} {str(path)!r} does not exist")
        self.metrics.check()
        for s in self.subjects:
            where = f"--subjects: subject {s.name!r}"
            if s.identity is not None and not s.identity.is_file():
                raise FileNotFoundError(f"{where}: identity file {str(s.identity)!r} does not exist")
            if not s.references.is_dir():
                raise FileNotFoundError(f"{where}: reference folder {str(s.references)!r} does not exist")
            try:
                load_reference_images(s.references)
                info = s.info()
                if not (s.class_word or (info.class_word if info else "")).strip():
                    raise ValueError("no class word (give class_word: in the subjects file)")
                if not s.prompts:
                    raise ValueError("the prompt list is empty")
                self.generate_config(s).check()
                if self.models.resolved_backbone() == "wan":
                    from .wan_generate import check_wan_request

                    check_wan_request(self.generate_config(s))
                check_prompt_tokens(list(s.prompts), [info] if info else [])
                if info is not None:
                    from .identity import check_identity_backbone

                    check_identity_backbone(s.identity, info, self.models.resolved_backbone())
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"{where}: {e}") from None

    def configuration(self, device=None) -> dict:
        """What makes rows comparable: generation settings and every model's identity (not the subjects or
    seeds, which only say which videos there are); with `device`, the device type and the precisions the
    videos are generated and scored in, so a resume elsewhere cannot mix them into one file."""
        gen = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("subjects", "seeds", "models", "metrics")}
        if device is not None:
            import torch

            device = torch.device(device)
            gen["device"] = device.type
            gen["dtype"] = str(self.models.speed.torch_dtype(device)).removeprefix("torch.")
            gen["metrics_dtype"] = "float16" if device.type == "cuda" else "float32"  # as `Scorer` loads them
        spec = self.models
        models = {"base": fingerprint(spec.base), "scheduler": spec.scheduler}
        if spec.resolved_backbone() == "wan":  # its own scheduler, no motion adapter; tiny Wan ≠ tiny AnimateDiff
            models = {"backbone": "wan", "base": spec.base_fingerprint()}
            if device is not None:
                from .wan import wan_dtype

                gen["dtype"] = str(wan_dtype(spec, device)).removeprefix("torch.")
        elif spec.base != "tiny":
            models["motion_adapter"] = fingerprint(spec.adapter_name())
        for key in ("face_score", "face_model", "face_detector"):
            del gen[key]
        metrics = {"clip": fingerprint(self.metrics.clip), "dino": fingerprint(self.metrics.dino),
                   **face_score_config(self.face_score, self.face_model, self.face_detector)}
        return json.loads(json.dumps({**gen, "models": models, "metrics": metrics}, default=str))


# ---- the subjects file ---------------------------------------------------------------------------

_SUBJECT_KEYS = {"name", "identity", "references", "prompts", "class_word"}
_MODEL_KEYS = {"base": "base", "motion_adapter": "motion_adapter", "base_config": "base_config", "scheduler": "scheduler",
               "backbone": "backbone"}
_SPEED_KEYS = {"dtype": "dtype"}  # auto: fp16 on CUDA, fp32 on CPU
_METRIC_KEYS = {"clip_model": "clip", "dino_model": "dino", "batch_size": "batch_size"}
_PLAIN_KEYS = {f.name for f in fields(SuiteConfig)} - {"subjects", "models", "metrics"}


def suite_backbones(path: str | Path) -> list[str]:
    """The entries of the subjects file's `backbones:` table, in order ([] when it has none)."""
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return []  # load_suite reports it
    table = doc.get("backbones") if isinstance(doc, dict) else None
    if table is None:
        return []
    if not isinstance(table, dict) or not table or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"--subjects {str(path)!r}: 'backbones' must map names to model settings, e.g. wan: {{backbone: wan, base: ...}}")
    return [str(k) for k in table]


def load_suites(path: str | Path, **overrides) -> dict[str, SuiteConfig]:
    """Every configuration of a subjects file: its `backbones:` entries by name, or {"": the one suite}."""
    names = suite_backbones(path)
    return {name: load_suite(path, backbone_entry=name, **overrides) for name in names} if names else {"": load_suite(path, **overrides)}


def load_suite(path: str | Path, backbone_entry: str | None = None, **overrides) -> SuiteConfig:
    """Read a subjects file (YAML; paths relative to it) into a checked `SuiteConfig`.

    `overrides` (CLI flags; None = keep the file's) may set any top-level key, e.g. gamma=0.0.
    Layout::

        seeds: [0, 1, 2, 3]
        gamma: 0.15
        base: tiny                      # or a hub id / folder / .safetensors
        clip_model: openai/clip-vit-base-patch32
        subjects:
          - name: dog
            identity: ids/dog.safetensors
            references: refs/dog
            class_word: dog             # optional: the identity file's
            prompts: ["a <v*> dog running on the beach", ...]
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--subjects {str(path)!r} does not exist")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--subjects {str(path)!r} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("subjects"), list):
        raise ValueError(f"--subjects {str(path)!r} must be a mapping with a 'subjects:' list")
    root = path.parent
    backbones = doc.pop("backbones", None)
    if backbones is not None:
        if backbone_entry is None or not isinstance(backbones, dict) or not isinstance(backbones.get(backbone_entry), dict):
            raise ValueError(f"--subjects {str(path)!r}: give the 'backbones' entry to run (load_suites runs each)")
        entry = backbones[backbone_entry]
        allowed = set(_MODEL_KEYS) | set(_SPEED_KEYS) | _PLAIN_KEYS
        if set(entry) - allowed:
            raise ValueError(f"--subjects {str(path)!r}: backbones.{backbone_entry}: unknown keys {sorted(set(entry) - allowed)}; known: {sorted(allowed)}")
        doc.update(entry)  # the entry's settings over the file's shared ones
    for key in ("face_model", "face_detector"):  # the file's paths are relative to it; a flag's to the cwd
        if doc.get(key):
            doc[key] = str(root / doc[key])
    for key in ("base", "motion_adapter", "base_config", "clip_model", "dino_model"):  # a local model, or a hub id
        if isinstance(doc.get(key), str) and (root / doc[key]).exists():
            doc[key] = str(root / doc[key])
    doc.update({k: v for k, v in overrides.items() if v is not None})
    known = {"subjects"} | set(_MODEL_KEYS) | set(_SPEED_KEYS) | set(_METRIC_KEYS) | _PLAIN_KEYS
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ValueError(f"--subjects {str(path)!r}: unknown keys {unknown}; known: {sorted(known)}")
    doc = _check_types(doc, path)
    subjects = [_subject(entry, i, root, path, backbone_entry) for i, entry in enumerate(doc["subjects"])]
    plain = {k: doc[k] for k in _PLAIN_KEYS if k in doc}
    if "seeds" in plain:
        plain["seeds"] = list(plain["seeds"]) if isinstance(plain["seeds"], (list, tuple)) else [plain["seeds"]]
    speed = SpeedOptions(**{v: doc[k] for k, v in _SPEED_KEYS.items() if k in doc})
    cfg = SuiteConfig(
        subjects=subjects,
        models=ModelSpec(**{v: doc[k] for k, v in _MODEL_KEYS.items() if k in doc}, speed=speed),
        metrics=MetricModels(**{v: doc[k] for k, v in _METRIC_KEYS.items() if k in doc}),
        **plain,
    )
    cfg.check()
    return cfg


def _check_types(doc: dict, path: Path) -> dict:
    """Every top-level value checked against the field that will hold it, before any model loads."""
    import typing

    hints = {k: typing.get_type_hints(SuiteConfig)[k] for k in _PLAIN_KEYS}
    hints["seeds"] = int | list[int]  # one seed or a list
    hints |= {k: typing.get_type_hints(ModelSpec)[v] for k, v in _MODEL_KEYS.items()}
    hints |= {k: typing.get_type_hints(MetricModels)[v] for k, v in _METRIC_KEYS.items()}
    hints |= {k: typing.get_type_hints(SpeedOptions)[v] for k, v in _SPEED_KEYS.items()}
    return {k: v if k == "subjects" else check_value(v, hints[k], f"--subjects {str(path)!r}: {k}") for k, v in doc.items()}


def _subject(entry, i: int, root: Path, path: Path, backbone_entry: str | None = None) -> Subject:
    if not isinstance(entry, dict):
        raise ValueError(f"--subjects {str(path)!r}: subject #{i + 1} must be a mapping")
    unknown = sorted(set(entry) - _SUBJECT_KEYS)
    missing = sorted({"identity", "references", "prompts"} - set(entry))
    name = entry.get("name") or f"subject{i + 1}"
    where = f"--subjects: subject {name!r}"
    if unknown or missing:
        raise ValueError(f"{where}: " + (f"unknown keys {unknown}" if unknown else f"missing {missing}"))
    safe_name(name, f"{where}: name")  # it names the subject's folder of videos
    prompts = entry["prompts"]
    if isinstance(prompts, str) or not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{where}: prompts must be a list of non-empty strings")
    identity = entry["identity"]
    if isinstance(identity, dict):  # one identity file per backbone entry
        if backbone_entry not in identity:
            raise ValueError(f"{where}: its identity names backbones {sorted(identity, key=str)}, "
                             f"not {backbone_entry!r}" if backbone_entry else f"{where}: an identity per "
                             "backbone needs a 'backbones:' table")
        identity = identity[backbone_entry]
    identity = check_value(identity, str | None, f"{where}: identity")
    references = check_value(entry["references"], str, f"{where}: references")
    class_word = check_value(entry.get("class_word"), str | None, f"{where}: class_word")
    return Subject(
        name=name,
        identity=None if identity in (None, "none") else root / identity,
        references=root / references,
        prompts=tuple(prompts),
        class_word=class_word or "",
    )


# ---- jobs and the results file -------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    subject: Subject
    prompt_index: int
    prompt: str
    seed: int

    @property
    def key(self) -> str:
        return job_key(self.subject.name, self.prompt, self.seed)


def job_key(subject: str, prompt: str, seed: int) -> str:
    return json.dumps([subject, prompt, seed])


def row_key(row: dict) -> str:
    return job_key(row["subject"], row["prompt"], row["seed"])


def jobs(cfg: SuiteConfig) -> list[Job]:
    """Every video of the protocol, subject-major (so a process switches identity rarely)."""
    return [Job(s, i, p, seed) for s in cfg.subjects for i, p in enumerate(s.prompts) for seed in cfg.seeds]


def config_id(configuration: dict) -> str:
    return hashlib.sha256(json.dumps(configuration, sort_keys=True).encode()).hexdigest()[:12]


def part_paths(results: Path) -> list[Path]:
    """Per-process row files of an accelerate run (left behind only by an interrupted run)."""
    return sorted(results.parent.glob(f"{results.name}.part-*"))


RESULTS_HEADER = {"format": "magicme.results/1", "written_by": "magicme evaluate-suite"}


def is_results_file(path: Path) -> bool:
    """A results (or part) file the suite wrote: it starts with the suite's header line, or (files from before
    the header) every line is a results row but a last one cut short. Only such a file is appended to or rewritten."""
    if not path.exists():
        return True
    if not path.is_file():
        return False
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    lines = [line for line in lines if line.strip()]
    if not lines:
        return True
    try:
        if json.loads(lines[0]) == RESULTS_HEADER:
            return True
    except ValueError:
        pass
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:  # the last line of a write cut short
                continue
            return False
        if not (isinstance(row, dict) and {"subject", "prompt", "seed", "config_id"} <= set(row)):
            return False
    return True


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a results (or part) file; a line cut short by an interruption is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an incomplete row (an interrupted write); its video is redone", path, n)
            continue
        if row == RESULTS_HEADER:
            continue
        if isinstance(row, dict) and {"subject", "prompt", "seed", "config_id"} <= set(row):
            rows.append(row)
        else:
            log.warning("%s:%d: skipping a line that is not a results row", path, n)
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append one row durably (flushed and fsynced), after mending a line cut short by a crash; a new file
    starts with the suite's header line."""
    with open(path, "ab") as fh:
        if fh.tell() == 0:
            fh.write((json.dumps(RESULTS_HEADER, sort_keys=True) + "\n").encode())
        else:
            with open(path, "rb") as rd:
                rd.seek(-1, os.SEEK_END)
                if rd.read(1) != b"\n":
                    fh.write(b"\n")
        fh.write((json.dumps(row, sort_keys=True) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


def check_compatible(rows: list[dict], configuration: dict, subjects: dict[str, dict], results: Path) -> None:
    """Refuse to add rows to a results file made with another configuration; say what differs."""
    cid = config_id(configuration)
    for row in rows:
        if row["config_id"] != cid:
            old = row.get("config", {})
            diff = sorted(k for k in set(old) | set(configuration) if old.get(k) != configuration.get(k))
            detail = "; ".join(f"{k}: {old.get(k)!r} there, {configuration.get(k)!r} now" for k in diff[:4])
            raise ValueError(
                f"--results {str(results)!r} was written with another configuration ({detail or 'unknown'}); "
                "use a new results file for this configuration (the report compares files side by side)"
            )
        now = subjects.get(row["subject"])
        if now is not None:
            for key in ("identity", "references"):
                if row.get(key) != now[key]:
                    raise ValueError(
                        f"--results {str(results)!r}: subject {row['subject']!r} has a different {key} than when its rows "
                        "were written; use a new results file"
                    )


def merge_results(results: Path) -> int:
    """Fold the part files into `results` (atomically; each job once, first row wins); return the row count."""
    parts = part_paths(results)
    rows, seen, duplicates = [], set(), 0
    for path in [results, *parts]:
        for row in read_rows(path):
            if row_key(row) in seen:
                duplicates += 1
                continue
            seen.add(row_key(row))
            rows.append(row)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in [RESULTS_HEADER, *rows])
    if parts or duplicates or (results.exists() and results.read_text() != text):
        write_text(results, text)
        for p in parts:  # only after the merged file is in place: a crash here leaves duplicates, never a loss
            p.unlink()
    return len(rows)


def subject_fingerprints(cfg: SuiteConfig) -> dict[str, dict]:
    out = {}
    for s in cfg.subjects:
        h = hashlib.sha256()
        for p in sorted(s.references.iterdir()):
            if p.is_file():
                h.update(p.name.encode() + hashlib.sha256(p.read_bytes()).digest())
        ident = fingerprint(str(s.identity)).get("fingerprint") if s.identity else None
        out[s.name] = {"identity": ident, "references": h.hexdigest()[:16]}
    return out


# ---- running ------------------------------------------------------------------------------------


def use_identity(pipe, path: Path, loaded: dict[str, Path]) -> IdentityInfo:
    """Make `path` the identity its token means in `pipe` (two subjects may share a token, e.g. a masked
    and an unmasked training of one subject: `load_identities` then replaces the vectors)."""
    from .identity import load_identities

    (info,) = load_identities(pipe, [path])
    loaded[info.token] = path
    return info


@dataclass(frozen=True)
class SuiteRun:
    """What one process of `run_suite` did."""

    results: Path
    process_index: int
    num_processes: int
    scored: int  # videos this process generated and scored now
    rows: int  # rows in the merged results file


def _process_state(device: str | None):
    import torch
    from accelerate import PartialState

    # cpu=True lets torchrun-launched processes on a GPU-less machine form a gloo group (MULTI_CPU)
    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


@contextmanager
def results_lock(results: Path, state):
    """One suite run at a time on a results file: the main process holds an exclusive lock on `RESULTS.lock`
    (released by the OS if the process dies) for the whole run, so a second run cannot merge over rows the
    first is still appending; it is refused in every process, naming the holder."""
    refused, fd, path = None, None, results.with_name(results.name + ".lock")
    if state.is_main_process:
        fd, refused = _lock_file(path, results)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refused])[0]
    if refused:
        raise ValueError(refused)
    try:
        yield
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # before unlocking: a run waiting on this file sees it is gone and retries
            os.close(fd)


def _lock_file(path: Path, results: Path) -> tuple[int | None, str | None]:
    """(fd holding an exclusive flock on `path`, None), or (None, why it is held by another run)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; a single run at a time is then the user's to ensure
        log.warning("--results: no file locking on this platform; do not run two suites on %s at once", results)
        return None, None
    import socket

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return None, (f"--results {str(results)!r} is in use by another evaluate-suite run ({holder}); "
                          "wait for it to finish, or use another results file")
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the run that held it removed it as we opened it: lock the new file
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd, None


def run_suite(cfg: SuiteConfig, results: str | Path, *, videos: str | Path | None = None, quiet: bool = False,
              device: str | None = None) -> SuiteRun:
    """Generate and score every job not yet in `results`; merge the rows into `results`.

    Runs unchanged in one process or under `accelerate launch` (jobs split by process index).
    `videos` (default: `<results>.videos/` beside it) receives each clip and its run record.
    A second run on the same results file while this one runs is refused (`results_lock`).
    """
    results = Path(results)
    if results.suffix != ".jsonl":
        raise ValueError(f"--results {str(results)!r} must end in .jsonl")
    cfg.check()
    videos = Path(videos) if videos else results.with_name(results.name + ".videos")
    check_outputs(cfg, results, videos)
    with results_lock(results, _process_state(device)):
        return _run_suite(cfg, results, videos=videos, quiet=quiet, device=device)


def _run_suite(cfg: SuiteConfig, results: Path, *, videos: str | Path | None, quiet: bool, device: str | None) -> SuiteRun:
    import sys

    from tqdm import tqdm

    from .evaluate import Scorer, resolve_face_score
    from .faces import is_person
    from .generate import generate_video, run_record
    from .models import load_pipeline
    from .video import read_video, write_video
    from .wan_generate import wan_suite_video

    videos = Path(videos)
    state = _process_state(device)
    dev = device or state.device
    configuration = cfg.configuration(dev)
    cid = config_id(configuration)
    subjects = subject_fingerprints(cfg)
    existing = [r for p in [results, *part_paths(results)] for r in read_rows(p)]
    check_compatible(existing, configuration, subjects, results)
    done = {row_key(r) for r in existing}
    todo = [j for j in jobs(cfg) if j.key not in done]
    state.wait_for_everyone()  # every process has read the same rows before any process writes one
    mine = todo[state.process_index :: state.num_processes]
    out = results if state.num_processes == 1 else results.with_name(f"{results.name}.part-{state.process_index:03d}")
    if mine:
        pipe = load_pipeline(cfg.models, device=dev)
        pipe.set_progress_bar_config(disable=True)
        people = any(is_person(s.class_word or (s.info().class_word if s.identity else "")) for s in cfg.subjects)
        face, people_only = resolve_face_score(cfg.face_score, cfg.face_model, cfg.face_detector, people=people)
        scorer = Scorer(cfg.metrics, device=dev, face=face, face_people_only=people_only)
        loaded: dict[str, Path] = {}
        wan = cfg.models.resolved_backbone() == "wan"
        if wan:
            from .wan_generate import wan_size

            height, width = wan_size(cfg.generate_config(cfg.subjects[0]))
        else:
            height, width = cfg.generate_config(cfg.subjects[0]).size(pipe)
        show = not quiet and sys.stderr.isatty() and state.is_main_process
        for job in tqdm(mine, desc="suite", disable=not show):
            s = job.subject
            if wan:  # the Wan clip and its record, from the same functions `magicme generate` uses
                frames, record, info = wan_suite_video(pipe, cfg.generate_config(s), job.prompt, job.seed, height, width)
            else:
                info = use_identity(pipe, s.identity, loaded) if s.identity else None
                frames = generate_video(
                    pipe, job.prompt, negative_prompt=cfg.negative_prompt, seed=job.seed, frames=cfg.frames,
                    height=height, width=width, steps=cfg.steps, guidance=cfg.guidance, gamma=cfg.gamma,
                )
                record = run_record(cfg.generate_config(s), job.prompt, job.seed, height, width)
            tag = hashlib.sha256(job.prompt.encode()).hexdigest()[:8]  # an edited prompt list never overwrites a kept clip
            clip = videos / s.name / f"p{job.prompt_index:03d}_{tag}_s{job.seed}.{cfg.video_format}"
            clip.parent.mkdir(parents=True, exist_ok=True)
            write_video(frames, clip, record=record)
            frames = read_video(clip)  # score the clip as saved (codec and all), as `magicme evaluate` on it would
            class_word = (s.class_word or info.class_word) if info else s.class_word
            token = info.token if info else None
            metrics = scorer.score(frames, s.references, job.prompt, token=token, class_word=class_word)
            row = {
                "config_id": cid, "subject": s.name, "prompt": job.prompt, "prompt_index": job.prompt_index,
                "seed": job.seed, "class_word": class_word, "token": token, "masked": info.masked if info else None,
                "gamma": cfg.gamma, "video": os.path.relpath(clip, results.parent), **subjects[s.name],
                **metrics, "config": configuration,
            }
            append_row(out, row)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_results(results)
    state.wait_for_everyone()
    return SuiteRun(results, state.process_index, state.num_processes, len(mine), len(read_rows(results)))


def check_outputs(cfg: SuiteConfig, results: Path, videos: Path) -> None:
    """Before any work: the results file and its part files are new or the suite's own, neither is an input,
    and the videos folder holds only clips magicme wrote where this run writes (its clip names)."""
    from .outputs import check_output, check_writable
    from .video import is_own_video

    inputs = [(f"subject {s.name!r} identity", s.identity) for s in cfg.subjects if s.identity]
    inputs += [(f"subject {s.name!r} references", s.references) for s in cfg.subjects]
    for path in [results, *part_paths(results)]:
        if not is_results_file(path):
            raise FileExistsError(
                f"--results {str(path)!r} exists and is not a magicme results file (no header line of the suite, "
                "and lines that are not results rows); name a new file"
            )
    check_output(results, arg="--results", owned=is_results_file, inputs=inputs, record=False)
    lock = results.with_name(results.name + ".lock")
    if lock.is_file() and not lock.read_bytes().startswith(b"pid "):  # ours hold "pid N on HOST"
        raise FileExistsError(f"--results: {str(lock)!r} exists and is not a lock file of the suite; move it away")
    check_output(videos, arg="--videos", folder=True, owned=lambda p: True, inputs=inputs, record=False)
    for s in cfg.subjects:
        folder = videos / s.name
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"--videos: {str(folder)!r} is a file, but subject {s.name!r}'s clips go there; move it away")
        foreign = [p for p in folder.glob("p*_s*.*") if p.suffix != ".json" and not is_own_video(p)] if folder.is_dir() else []
        if foreign:
            raise FileExistsError(f"--videos: {str(foreign[0])!r} was not written by magicme; move it away")
        if folder.is_dir():
            check_writable(folder, "--videos", folder)
def backbone_paths(results: str | Path, videos: str | Path | None, name: str) -> tuple[Path, Path | None]:
    """(results file, videos folder) of one `backbones:` entry: `results.<name>.jsonl` and `videos/<name>`."""
    results = Path(results)
    if not name:
        return results, Path(videos) if videos else None
    return results.with_name(f"{results.stem}.{name}.jsonl"), Path(videos) / name if videos else None


def suite_overrides(**kwargs) -> dict:
    """CLI values worth passing on to `load_suite` (None and empty lists mean: keep the file's)."""
    return {k: v for k, v in kwargs.items() if v not in (None, [], ())}

