"""`magicme run`: the whole chain from reference photos to the final video, from one config file.

prepare → train → generate → face → upscale → evaluate, each writing into one work folder. A stage
is skipped when its output exists and a stamp beside it says it was made from the same settings and
the same inputs (content hashes), so a rerun after a failure resumes where it stopped, and changing
one setting reruns that stage and everything downstream of it. Models load once for the video stages.

The config file (YAML or TOML) has top-level keys `images`, `class_word`, `token`, `prompt`,
`work_dir`, `models`, and one table per stage holding that stage's own options (the same names as
its CLI flags, with underscores); `face: false` / `upscale: false` / `evaluate: false` skip a stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .models import ModelSpec

STAGES = ("prepare", "train", "generate", "face", "upscale", "evaluate")
OUTPUTS = {
    "prepare": "prepared",
    "train": "identity.safetensors",
    "generate": "t2v.mp4",
    "face": "face.mp4",
    "upscale": "upscaled.mp4",
    "evaluate": "metrics.json",
}
_TOP = {"images", "class_word", "token", "prompt", "negative_prompt", "seed", "gamma", "work_dir", "models", "metric_models", *STAGES}
# keys a stage table may not set: the chain wires them itself
_WIRED = {"images", "data", "out", "class_word", "token", "prompt", "prompts", "negative_prompt", "identities",
          "models", "seed", "seeds", "gamma"}


@dataclass
class ChainConfig:
    """A parsed and validated run config; paths are absolute."""

    images: Path
    class_word: str
    work_dir: Path
    prompt: str
    token: str = "<v*>"
    negative_prompt: str = ""
    seed: int = 0
    gamma: float = 0.15  # §5.2
    models: ModelSpec = field(default_factory=ModelSpec)
    stages: dict[str, dict | None] = field(default_factory=dict)  # None: stage skipped
    metric_models: dict[str, Any] = field(default_factory=dict)


def read_config_file(path: str | Path) -> dict:
    """Parse YAML (.yaml/.yml) or TOML (.toml) into a dict, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ValueError(f"--config {str(path)!r} must be .yaml, .yml or .toml")
    except (ValueError, ImportError) as e:
        raise ValueError(f"--config {str(path)!r}: {e}") from None
    except Exception as e:  # yaml.YAMLError does not subclass ValueError
        raise ValueError(f"--config {str(path)!r} is not valid: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {str(path)!r} must hold a mapping of settings")
    return data


def _stage_config_class(stage: str):
    from .face import FaceConfig
    from .prepare import PrepareConfig
    from .train import TrainConfig
    from .upscale import UpscaleConfig
    from .generate import GenerateConfig

    return {"prepare": PrepareConfig, "train": TrainConfig, "generate": GenerateConfig, "face": FaceConfig, "upscale": UpscaleConfig}.get(stage)


def load_chain_config(path: str | Path, **overrides) -> ChainConfig:
    """Read and validate a run config; unknown keys are errors (a typo must not be silently ignored)."""
    path = Path(path)
    data = read_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(data) - _TOP
    if unknown:
        raise ValueError(f"--config {str(path)!r}: unknown keys {sorted(unknown)}; known: {sorted(_TOP)}")
    for key in ("images", "class_word", "prompt"):
        if not data.get(key):
            raise ValueError(f"--config {str(path)!r}: '{key}' is required")
    root = path.resolve().parent
    models = data.get("models") or {}
    known_models = {f.name for f in dataclasses.fields(ModelSpec)}
    if not isinstance(models, dict) or set(models) - known_models:
        raise ValueError(f"--config {str(path)!r}: models may hold {sorted(known_models)}")
    if isinstance(models.get("speed"), dict):
        from .speed import SpeedOptions

        known_speed = {f.name for f in dataclasses.fields(SpeedOptions)}
        if set(models["speed"]) - known_speed:
            raise ValueError(f"--config {str(path)!r}: models.speed may hold {sorted(known_speed)}")
        models["speed"] = SpeedOptions(**models["speed"])
    for key in ("base", "motion_adapter", "base_config"):
        value = models.get(key)
        if value and value != "tiny" and (root / value).exists():  # relative local paths are relative to the file
            models[key] = str(root / value)
    for key in ("loras", "motion_loras"):  # "FILE[:SCALE]" entries, files relative to the config file
        from .lora import parse_lora

        entries = [models[key]] if isinstance(models.get(key), str) else list(models.get(key) or [])
        for i, entry in enumerate(entries):
            file, scale = parse_lora(str(entry))
            if (root / file).exists():
                entries[i] = f"{root / file}:{scale}"
        models[key] = tuple(entries)
    stages: dict[str, dict | None] = {}
    for stage in STAGES:
        table = data.get(stage, {})
        if table is False:
            if stage in ("prepare", "train", "generate"):
                raise ValueError(f"--config {str(path)!r}: stage '{stage}' cannot be turned off")
            stages[stage] = None
            continue
        table = dict(table or {})
        cls = _stage_config_class(stage)
        if cls is not None:
            allowed = {f.name for f in dataclasses.fields(cls)} - _WIRED
            bad = set(table) - allowed
            if bad:
                raise ValueError(f"--config {str(path)!r}: [{stage}] does not take {sorted(bad)}; it takes {sorted(allowed)}")
        stages[stage] = table
    metric = data.get("metric_models") or {}
    cfg = ChainConfig(
        images=(root / data["images"]).resolve(),
        class_word=str(data["class_word"]),
        work_dir=(root / data.get("work_dir", "magicme-run")).resolve(),
        prompt=str(data["prompt"]),
        token=str(data.get("token", "<v*>")),
        negative_prompt=str(data.get("negative_prompt", "")),
        seed=int(data.get("seed", 0)),
        gamma=data.get("gamma", 0.15),
        models=ModelSpec(**models),
        stages=stages,
        metric_models={k: (str(root / v) if isinstance(v, str) and (root / v).exists() else v) for k, v in metric.items()},
    )
    build_stage_configs(cfg)  # every stage's own check runs before any work
    return cfg


def build_stage_configs(cfg: ChainConfig) -> dict[str, Any]:
    """The stage config objects the chain will run, wired to each other's outputs in `cfg.work_dir`."""
    from .face import FaceConfig
    from .generate import GenerateConfig
    from .identity import IdentityInfo, check_prompt_tokens
    from .prepare import AugmentConfig, PrepareConfig
    from .segment import SegmenterConfig
    from .train import TrainConfig
    from .upscale import UpscaleConfig

    if not cfg.images.is_dir():
        raise FileNotFoundError(f"images {str(cfg.images)!r} is not a folder")
    w = cfg.work_dir
    out = {s: w / OUTPUTS[s] for s in STAGES}
    st = cfg.stages
    prep = dict(st["prepare"])
    prep["segmenter"] = SegmenterConfig(**prep.get("segmenter", {}))  # a sub-table: method, model ids, thresholds
    train_opts = dict(st["train"])
    if "augment" in train_opts:
        train_opts["augment"] = AugmentConfig(**train_opts["augment"])
    shared = dict(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, seed=cfg.seed, gamma=cfg.gamma,
                  identities=[str(out["train"])], models=cfg.models)
    configs: dict[str, Any] = {
        "prepare": PrepareConfig(images=cfg.images, class_word=cfg.class_word, out=out["prepare"], **prep),
        # the identity trains on the plain base; the LoRAs join at generation (the paper's "mix and match")
        "train": TrainConfig(data=out["prepare"], token=cfg.token, class_word=cfg.class_word, out=out["train"],
                             models=dataclasses.replace(cfg.models, loras=()), seed=cfg.seed, **train_opts),
        "generate": GenerateConfig(prompts=[cfg.prompt], negative_prompt=cfg.negative_prompt, seeds=[cfg.seed],
                                   gamma=cfg.gamma, identities=[str(out["train"])], models=cfg.models, **st["generate"]),
    }
    if st["face"] is not None:
        configs["face"] = FaceConfig(**shared, **st["face"])
    if st["upscale"] is not None:
        configs["upscale"] = UpscaleConfig(**shared, **st["upscale"])
    if st["evaluate"] is not None:
        configs["evaluate"] = dict(st["evaluate"])
    # Each stage checks its own settings now; the inputs made by earlier stages (prepared set, identity,
    # videos) do not exist yet, so those are checked when the stage starts (train's settings too).
    with tempfile.TemporaryDirectory() as tmp:  # the work folder is not made before the settings pass
        dataclasses.replace(configs["prepare"], out=Path(tmp) / "prepared").check()
    for stage in ("generate", "face", "upscale"):
        if stage in configs:
            dataclasses.replace(configs[stage], identities=[]).check()
    check_prompt_tokens([cfg.prompt], [IdentityInfo(token=cfg.token, class_word=cfg.class_word, num_vectors=1)])
    return configs


# ---- freshness stamps ----

def content_hash(path: Path) -> str:
    """sha256 over a file's bytes, or a folder's files (names and bytes), in a stable order."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def stage_stamp(settings: Any, inputs: list[Path]) -> dict:
    return {"settings": _jsonable(settings), "inputs": {str(p): content_hash(p) for p in inputs}}


def _stamp_path(work_dir: Path, stage: str) -> Path:
    return work_dir / ".stages" / f"{stage}.json"


def is_fresh(work_dir: Path, stage: str, output: Path, stamp: dict) -> bool:
    path = _stamp_path(work_dir, stage)
    return output.exists() and path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(stamp))


def write_stamp(work_dir: Path, stage: str, stamp: dict) -> None:
    path = _stamp_path(work_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".stamp.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(stamp, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ---- the chain ----

@dataclass
class ChainResult:
    outputs: dict[str, Path]
    ran: list[str]
    skipped: list[str]


def run_chain(cfg: ChainConfig, *, quiet: bool = False, device: str | None = None,
              log: Callable[[str], None] = print) -> ChainResult:
    """Run every enabled stage in order, skipping the ones that are up to date."""
    from .face import face_vcd
    from .generate import generate
    from .models import load_pipeline
    from .prepare import prepare_identity_set
    from .train import train
    from .upscale import tiled_vcd

    configs = build_stage_configs(cfg)
    w = cfg.work_dir
    w.mkdir(parents=True, exist_ok=True)
    out = {s: w / OUTPUTS[s] for s in STAGES if s in configs}
    pipe = None

    def video_pipe():
        nonlocal pipe
        if pipe is None:  # one load for generate, face and upscale
            pipe = load_pipeline(cfg.models, device=device)
        return pipe

    chain_video = out["generate"]
    steps: list[tuple[str, list[Path], Callable[[], Any]]] = [
        ("prepare", [cfg.images], lambda: prepare_identity_set(configs["prepare"])),
        ("train", [out["prepare"]], lambda: train(configs["train"], quiet=quiet, device=device)),
        ("generate", [out["train"]], lambda: generate(configs["generate"], out["generate"], pipe=video_pipe(), quiet=quiet)),
    ]
    if "face" in configs:
        src = chain_video
        steps.append(("face", [src, out["train"]], lambda src=src: face_vcd(configs["face"], src, out["face"], pipe=video_pipe(), quiet=quiet)))
        chain_video = out["face"]
    if "upscale" in configs:
        src = chain_video
        steps.append(("upscale", [src, out["train"]], lambda src=src: tiled_vcd(configs["upscale"], src, out["upscale"], pipe=video_pipe(), quiet=quiet)))
        chain_video = out["upscale"]
    if "evaluate" in configs:
        final = chain_video
        steps.append(("evaluate", [final, out["prepare"], out["train"]], lambda final=final: _evaluate(cfg, configs["evaluate"], final, out, device)))

    ran, skipped = [], []
    for stage, inputs, action in steps:
        stamp = stage_stamp(configs[stage], inputs)
        if is_fresh(w, stage, out[stage], stamp):
            skipped.append(stage)
            log(f"[{stage}] up to date: {out[stage]}")
            continue
        log(f"[{stage}] running …")
        action()
        write_stamp(w, stage, stamp)  # only after the stage's output is complete
        ran.append(stage)
        log(f"[{stage}] wrote {out[stage]}")
    return ChainResult(outputs=out, ran=ran, skipped=skipped)


def _evaluate(cfg: ChainConfig, options: dict, video: Path, out: dict[str, Path], device: str | None) -> Path:
    """Score the final video against the prepared reference images; write metrics.json atomically."""
    from .evaluate import MetricModels, evaluate_video

    models = MetricModels(**{**cfg.metric_models, **options})
    scores = evaluate_video(video, out["prepare"] / "images", cfg.prompt, identity=out["train"], models=models, device=device)
    record = {"video": str(video), "prompt": cfg.prompt, "metric_models": _jsonable(models), "scores": scores}
    fd, tmp = tempfile.mkstemp(prefix=".metrics.", dir=out["evaluate"].parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=2, default=float)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out["evaluate"])
    return out["evaluate"]
