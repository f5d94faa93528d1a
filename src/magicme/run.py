"""`magicme run`: the whole chain from reference photos to the final video, from one config file.

prepare → train → generate → face → upscale → evaluate, each writing into one work folder. A stage
is skipped when its output exists and a stamp beside it says it was made from the same settings and
the same inputs (content hashes), so a rerun after a failure resumes where it stopped, and changing
one setting reruns that stage and everything downstream of it.

The identity is trained with `train.seed`; the videos are made for every seed of `generate.seeds`
and named by it (`t2v_s42.mp4`, `face_s42.mp4`, `upscaled_s42.mp4`, `metrics_s42.json`), so a new
video seed reruns only the video stages of that seed and every earlier clip stays. The model weights
load once: training borrows the base model's components and the video pipeline is built on them.

The config file (YAML or TOML) has top-level keys `images`, `class_word`, `token`, `prompt`,
`work_dir`, `models`, and one table per stage holding that stage's own options (the same names as
its CLI flags, with underscores); `face: false` / `upscale: false` / `evaluate: false` skip a stage.
Every key and the type of every value are checked before any work.

`models.backbone: wan` (or a Wan `models.base`) runs the chain on Wan 2.x: the train table then also takes
`form` (tokens or lora) and `lora_rank`, the clips default to Wan's 81 frames at 16 fps, and Face and Tiled VCD
write at the generated clip's frame rate (as on AnimateDiff).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .models import TINY, ModelSpec
from .records import build_config, check_value, content_hash, to_jsonable

STAGES = ("prepare", "train", "generate", "face", "upscale", "evaluate")
OUTPUTS = {  # {seed}: the video seed of a per-clip stage
    "prepare": "prepared",
    "train": "identity.safetensors",
    "generate": "t2v_s{seed}.mp4",
    "face": "face_s{seed}.mp4",
    "upscale": "upscaled_s{seed}.mp4",
    "evaluate": "metrics_s{seed}.json",
}
VIDEO_STAGES = ("generate", "face", "upscale", "evaluate")  # one output per video seed
_TOP = {"images": str, "class_word": str, "token": str, "prompt": str, "negative_prompt": str, "seed": int,
        "gamma": float, "work_dir": str, "models": dict, "metric_models": dict, **{s: dict | bool | None for s in STAGES}}
# keys a stage table may not set: the chain wires them itself (the seeds: train.seed, generate.seed(s))
_WIRED = {"images", "data", "out", "class_word", "token", "prompt", "prompts", "negative_prompt", "identities",
          "models", "gamma"}
_OWN_SEED = {"train": {"seed"}, "generate": {"seeds"}}


@dataclass
class ChainConfig:
    """A parsed and validated run config; paths are absolute."""

    images: Path
    class_word: str
    work_dir: Path
    prompt: str
    token: str = "<v*>"
    negative_prompt: str = ""
    gamma: float = 0.15  # §5.2
    models: ModelSpec = field(default_factory=ModelSpec)
    stages: dict[str, dict | None] = field(default_factory=dict)  # None: stage skipped
    metric_models: dict[str, Any] = field(default_factory=dict)

    def video_seeds(self) -> list[int]:
        return list(dict.fromkeys(self.stages["generate"].get("seeds", [0])))


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


def _stage_config_class(stage: str, backbone: str = "animatediff"):
    from .evaluate import MetricModels
    from .face import FaceConfig
    from .generate import GenerateConfig
    from .prepare import PrepareConfig
    from .train import TrainConfig
    from .upscale import UpscaleConfig

    if stage == "train" and backbone == "wan":
        from .wan_train import WanTrainConfig

        return WanTrainConfig
    return {"prepare": PrepareConfig, "train": TrainConfig, "generate": GenerateConfig, "face": FaceConfig,
            "upscale": UpscaleConfig, "evaluate": MetricModels}[stage]


def _stage_table(stage: str, table: dict, backbone: str = "animatediff") -> dict:
    """A stage table with its keys checked (unknown or wired keys are errors) and its values' types checked."""
    import typing

    cls = _stage_config_class(stage, backbone)
    table = dict(table)
    if stage == "generate" and "seed" in table:  # one seed is a list of one
        if "seeds" in table:
            raise ValueError("[generate] takes 'seed' or 'seeds', not both")
        table["seeds"] = [check_value(table.pop("seed"), int, "generate.seed")]
    wired = _WIRED | ({"seed", "seeds"} - _OWN_SEED.get(stage, set())) if stage != "evaluate" else set()
    allowed = {f.name for f in dataclasses.fields(cls)} - wired
    bad = set(table) - allowed
    if bad:
        hint = " (the video seed is generate.seed; Face and Tiled VCD use it too)" if bad & {"seed", "seeds"} else ""
        raise ValueError(f"[{stage}] does not take {sorted(bad)}{hint}; it takes {sorted(allowed)}")
    hints = typing.get_type_hints(cls)
    return {k: check_value(v, hints[k], f"{stage}.{k}") for k, v in table.items()}


def load_chain_config(path: str | Path, **overrides) -> ChainConfig:
    """Read and validate a run config; unknown keys and values of the wrong type are errors, before any work."""
    path = Path(path)
    data = read_config_file(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return _parse_chain_config(data, path)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith("--config") else f"--config {str(path)!r}: {message}") from None


def _parse_chain_config(data: dict, path: Path) -> ChainConfig:
    from .evaluate import MetricModels

    unknown = set(data) - set(_TOP)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; known: {sorted(_TOP)}")
    for key, kind in _TOP.items():
        if key in data:
            data[key] = check_value(data[key], kind, key)
    for key in ("images", "class_word", "prompt"):
        if not data.get(key):
            raise ValueError(f"'{key}' is required")
    root = path.resolve().parent
    models = build_config(ModelSpec, data.get("models") or {}, "models")
    for key in ("base", "motion_adapter", "base_config"):
        value = getattr(models, key)
        if value and value != TINY and (root / value).exists():  # relative local paths are relative to the file
            models = dataclasses.replace(models, **{key: str(root / value)})
    for key in ("loras", "motion_loras"):  # "FILE[:SCALE]" entries, files relative to the config file
        from .lora import parse_lora

        entries = list(getattr(models, key))
        for i, entry in enumerate(entries):
            file, scale = parse_lora(str(entry))
            if (root / file).exists():
                entries[i] = f"{root / file}:{scale}"
        models = dataclasses.replace(models, **{key: tuple(entries)})
    backbone = models.resolved_backbone()
    stages: dict[str, dict | None] = {}
    for stage in STAGES:
        table = data.get(stage, {})
        if table is False:
            if stage in ("prepare", "train", "generate"):
                raise ValueError(f"stage '{stage}' cannot be turned off")
            stages[stage] = None
            continue
        if table is True:
            table = {}
        stages[stage] = _stage_table(stage, table or {}, backbone)
    if "seed" in data:  # before the video and training seeds were separate, one key set both
        if "seeds" in stages["generate"]:
            raise ValueError("give the video seed as generate.seed (top-level 'seed' is its old name), not both")
        stages["generate"]["seeds"] = [data["seed"]]
    metric = dict(data.get("metric_models") or {})
    build_config(MetricModels, metric, "metric_models")  # types and keys
    cfg = ChainConfig(
        images=(root / data["images"]).resolve(),
        class_word=data["class_word"],
        work_dir=(root / data.get("work_dir", "magicme-run")).resolve(),
        prompt=data["prompt"],
        token=data.get("token", "<v*>"),
        negative_prompt=data.get("negative_prompt", ""),
        gamma=data.get("gamma", 0.15),
        models=models,
        stages=stages,
        metric_models={k: (str(root / v) if isinstance(v, str) and v != TINY and (root / v).exists() else v)
                       for k, v in metric.items()},
    )
    build_stage_configs(cfg)  # every stage's own check runs before any work
    if "seed" in data:  # said once the config is valid: bad input gets its one error line alone
        print("magicme run: note: top-level 'seed' is now the video seed only (generate.seed); "
              "the identity is trained with train.seed (default 0)", file=sys.stderr)
    return cfg


def output_path(work_dir: Path, stage: str, seed: int | None = None) -> Path:
    return work_dir / OUTPUTS[stage].format(seed=seed)


def build_stage_configs(cfg: ChainConfig) -> dict[str, Any]:
    """The stage config objects the chain will run, wired to each other's outputs in `cfg.work_dir`.

    The video stages' configs are templates: `job_configs` sets each clip's seed.
    """
    from .face import FaceConfig
    from .generate import GenerateConfig
    from .identity import IdentityInfo, check_prompt_tokens
    from .prepare import PrepareConfig
    from .upscale import UpscaleConfig

    if not cfg.images.is_dir():
        raise FileNotFoundError(f"images {str(cfg.images)!r} is not a folder")
    from .wan_generate import default_clip

    w = cfg.work_dir
    identity = str(output_path(w, "train"))
    st = cfg.stages
    shared = dict(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, gamma=cfg.gamma,
                  identities=[identity], models=cfg.models)
    frames, fps = default_clip(cfg.models)  # Wan: 81 at 16 fps
    gen_table = {"frames": frames, "fps": fps} | st["generate"]
    train_class = _stage_config_class("train", cfg.models.resolved_backbone())
    configs: dict[str, Any] = {
        "prepare": PrepareConfig(images=cfg.images, class_word=cfg.class_word, out=output_path(w, "prepare"), **st["prepare"]),
        # the identity trains on the plain base; the LoRAs join at generation (the paper's "mix and match")
        "train": train_class(data=output_path(w, "prepare"), token=cfg.token, class_word=cfg.class_word, out=identity,
                             models=dataclasses.replace(cfg.models, loras=(), motion_loras=()), **st["train"]),
        "generate": GenerateConfig(prompts=[cfg.prompt], negative_prompt=cfg.negative_prompt, gamma=cfg.gamma,
                                   identities=[identity], models=cfg.models, **gen_table),
    }
    clip_fps = {"fps": gen_table["fps"]}  # Face and Tiled VCD keep the generated clip's frame rate unless told
    if st["face"] is not None:
        configs["face"] = FaceConfig(**shared, **(clip_fps | st["face"]))
    if st["upscale"] is not None:
        configs["upscale"] = UpscaleConfig(**shared, **(clip_fps | st["upscale"]))
    if st["evaluate"] is not None:
        from .evaluate import MetricModels

        configs["evaluate"] = MetricModels(**{**cfg.metric_models, **st["evaluate"]})
    # Each stage checks its own settings now; the inputs made by earlier stages (prepared set, identity,
    # videos) do not exist yet, so those are checked when the stage starts.
    with tempfile.TemporaryDirectory() as tmp:  # the work folder is not made before the settings pass
        dataclasses.replace(configs["prepare"], out=Path(tmp) / "prepared").check()
    configs["train"].check_settings()
    for stage in ("generate", "face", "upscale"):
        if stage in configs:
            dataclasses.replace(configs[stage], identities=[]).check()
    if "evaluate" in configs:
        configs["evaluate"].check()
    check_prompt_tokens([cfg.prompt], [IdentityInfo(token=cfg.token, class_word=cfg.class_word, num_vectors=1)])
    return configs


def is_own_metrics(path: Path) -> bool:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"video", "prompt", "metric_models", "scores"} <= set(record)


def check_work_dir(cfg: ChainConfig, configs: dict[str, Any]) -> None:
    """Before any work: the work folder can be written, and each stage's output in it is new or one magicme
    wrote (a rerun replaces only those); the prepared set is not the photos' folder."""
    from .outputs import check_not_input, check_output, check_writable, written_by_magicme
    from .prepare import is_prepared_folder
    from .train import check_checkpoint_dir
    from .video import is_own_video

    w = cfg.work_dir
    check_not_input(output_path(w, "prepare"), [("images", cfg.images)], "work_dir prepared/")
    if not w.exists():
        return check_writable(next(p for p in w.parents if p.exists()), "work_dir", w)
    if not w.is_dir():
        raise FileExistsError(f"work_dir {str(w)!r} is a file; name a folder")
    kinds = {  # stage: (a folder, a run record beside it, who wrote it)
        "prepare": (True, False, is_prepared_folder),
        "train": (False, True, written_by_magicme),
        "generate": (False, True, is_own_video),
        "face": (False, True, is_own_video),
        "upscale": (False, True, is_own_video),
        "evaluate": (False, False, is_own_metrics),
    }
    for stage in configs:
        folder, record, owned = kinds[stage]
        for seed in cfg.video_seeds() if stage in VIDEO_STAGES else [None]:
            check_output(output_path(w, stage, seed), arg=f"work_dir {stage} output", folder=folder, record=record, owned=owned)
    check_checkpoint_dir(configs["train"].checkpoints())


# ---- freshness stamps ----

def stage_stamp(settings: Any, inputs: list[Path]) -> dict:
    return {"settings": to_jsonable(settings), "inputs": {str(p): content_hash(p) for p in inputs}}


def _stamp_path(work_dir: Path, label: str) -> Path:
    return work_dir / ".stages" / f"{label.replace(' ', '_')}.json"


def is_fresh(work_dir: Path, label: str, output: Path, stamp: dict) -> bool:
    path = _stamp_path(work_dir, label)
    return output.exists() and path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(stamp))


def write_stamp(work_dir: Path, label: str, stamp: dict) -> None:
    from .outputs import write_text

    path = _stamp_path(work_dir, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(stamp, indent=1, sort_keys=True))


# ---- the models, loaded once ----

class ChainModels:
    """One copy of the weights for the whole chain: training borrows the base model's components, and the
    video pipeline is built on those same components afterwards (nothing loads twice).

    Training borrows them only where its frozen weights would have the video pipeline's dtype anyway (CPU,
    or CUDA with `train.mixed_precision` giving the pipeline's dtype), so its numerics are exactly those of
    `magicme train`; otherwise it loads its own copy, as `magicme train` does.
    """

    def __init__(self, spec: ModelSpec, device: str | None, train_precision: str, log: Callable[[str], None]):
        import torch

        from .train import autocast_dtype

        self.spec, self.log = spec, log
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = spec.speed.torch_dtype(self.device)
        self.shareable = (autocast_dtype(self.device, train_precision) or torch.float32) == self.dtype
        self._parts: dict | None = None
        self._pipe = None

    def training_parts(self) -> dict | None:
        """The base model's components for `train(components=...)`, or None (train loads its own)."""
        from .models import load_base, tiny_components

        if self.spec.resolved_backbone() == "wan":  # the Wan trainer loads its own frozen copy
            if self.spec.base != TINY:
                self.log("[train] loads its own copy of the Wan weights; the video stages load theirs after training")
            return None
        if not self.shareable:
            self.log(f"[train] loads its own copy of the weights: it trains at another precision than the "
                     f"video pipeline's {self.dtype} (set models.speed.dtype or train.mixed_precision to share one)")
            return None
        if self._parts is None:
            spec = self.spec
            self._parts = tiny_components() if spec.base == TINY else load_base(spec.base, dtype=self.dtype, config=spec.base_config)
        return self._parts

    def pipe(self):
        from .models import load_pipeline

        if self._pipe is None:
            self._pipe = load_pipeline(self.spec, device=self.device, base_parts=self._parts)
            self._parts = None  # the pipeline holds what it needs; the 2D UNet can go
        return self._pipe


# ---- the chain ----

@dataclass
class StageRun:
    """One stage of the chain for one output: what ran, how long it took, where it wrote."""

    stage: str
    seed: int | None
    output: Path
    ran: bool
    seconds: float | None = None

    @property
    def label(self) -> str:
        return self.stage if self.seed is None else f"{self.stage} s{self.seed}"


@dataclass
class ChainResult:
    runs: list[StageRun]
    work_dir: Path

    @property
    def outputs(self) -> dict[str, Path]:
        return {r.label: r.output for r in self.runs}

    @property
    def ran(self) -> list[str]:
        return [r.label for r in self.runs if r.ran]

    @property
    def skipped(self) -> list[str]:
        return [r.label for r in self.runs if not r.ran]

    def metrics(self) -> dict[int, dict]:
        """Video seed → the scores in its metrics file."""
        return {r.seed: json.loads(r.output.read_text())["scores"] for r in self.runs if r.stage == "evaluate"}


def chain_jobs(cfg: ChainConfig, configs: dict[str, Any], models: ChainModels, quiet: bool,
               ) -> list[tuple[StageRun, Any, list[Path], Callable[[], Any]]]:
    """Every (stage, seed) of the chain in order: its record, stamped settings, inputs and action."""
    from .face import face_vcd
    from .generate import generate
    from .prepare import prepare_identity_set
    from .train import train
    from .upscale import tiled_vcd

    w = cfg.work_dir
    prepared, identity = output_path(w, "prepare"), output_path(w, "train")
    jobs = [
        (StageRun("prepare", None, prepared, False), configs["prepare"], [cfg.images],
         lambda: prepare_identity_set(configs["prepare"], quiet=quiet)),
        (StageRun("train", None, identity, False), configs["train"], [prepared],
         lambda: train(configs["train"], quiet=quiet, device=str(models.device), components=models.training_parts())),
    ]
    for seed in cfg.video_seeds():
        out = {s: output_path(w, s, seed) for s in VIDEO_STAGES}
        gen = dataclasses.replace(configs["generate"], seeds=[seed])
        jobs.append((StageRun("generate", seed, out["generate"], False), gen, [identity],
                     lambda gen=gen, o=out["generate"]: generate(gen, o, pipe=models.pipe(), quiet=quiet)))
        video = out["generate"]
        for stage, run in (("face", face_vcd), ("upscale", tiled_vcd)):
            if stage in configs:
                c = dataclasses.replace(configs[stage], seed=seed)
                jobs.append((StageRun(stage, seed, out[stage], False), c, [video, identity],
                             lambda run=run, c=c, src=video, o=out[stage]: run(c, src, o, pipe=models.pipe(), quiet=quiet)))
                video = out[stage]
        if "evaluate" in configs:
            jobs.append((StageRun("evaluate", seed, out["evaluate"], False), configs["evaluate"], [video, prepared, identity],
                         lambda v=video, o=out["evaluate"]: _evaluate(cfg, configs["evaluate"], v, prepared, identity, o, models.device)))
    return jobs


def run_chain(cfg: ChainConfig, *, quiet: bool = False, device: str | None = None,
              log: Callable[[str], None] = print) -> ChainResult:
    """Run every enabled stage in order (the video stages once per video seed), skipping the up-to-date ones."""
    configs = build_stage_configs(cfg)
    w = cfg.work_dir
    check_work_dir(cfg, configs)
    w.mkdir(parents=True, exist_ok=True)
    models = ChainModels(cfg.models, device, configs["train"].mixed_precision, log)
    jobs = chain_jobs(cfg, configs, models, quiet)
    runs = []
    for i, (run, settings, inputs, action) in enumerate(jobs, 1):
        where = f"[{i}/{len(jobs)} {run.label}]"
        stamp = stage_stamp(settings, inputs)
        if is_fresh(w, run.label, run.output, stamp):
            log(f"{where} up to date: {run.output}")
        else:
            log(f"{where} running …")
            start = time.perf_counter()
            action()
            run.seconds = time.perf_counter() - start
            run.ran = True
            write_stamp(w, run.label, stamp)  # only after the stage's output is complete
            log(f"{where} wrote {run.output} ({format_seconds(run.seconds)})")
        runs.append(run)
    return ChainResult(runs, w)


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


METRIC_NAMES = {"clip_i": "CLIP-I", "dino": "DINO", "clip_t": "CLIP-T", "temporal_clip": "temporal CLIP",
                "temporal_dino": "temporal DINO", "motion": "motion", "face": "face"}


def chain_summary(result: ChainResult) -> str:
    """End-of-run table: each stage's output, whether it ran and how long it took; the metrics per video seed."""
    rows = [(r.label, f"ran in {format_seconds(r.seconds)}" if r.ran else "up to date",
             os.path.relpath(r.output, result.work_dir)) for r in result.runs]
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"  {a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
    total = sum(r.seconds or 0.0 for r in result.runs)
    lines.append(f"  {'total':<{width[0]}}  {format_seconds(total)} of work in {result.work_dir}")
    for seed, scores in result.metrics().items():
        values = ", ".join(f"{name} {scores[key]:.3f}" for key, name in METRIC_NAMES.items() if scores.get(key) is not None)
        lines.append(f"  metrics s{seed}: {values}")
    return "\n".join(lines)


def _evaluate(cfg: ChainConfig, models, video: Path, prepared: Path, identity: Path, out: Path, device) -> Path:
    """Score a final video against the prepared reference images; write its metrics file atomically."""
    from .evaluate import evaluate_video

    references = prepared / "images"
    scores = evaluate_video(video, references, cfg.prompt, identity=identity, models=models, device=str(device))
    record = {"video": str(video), "video_sha256": content_hash(video), "prompt": cfg.prompt,
              "references": str(references), "references_sha256": content_hash(references),
              "metric_models": to_jsonable(models), "scores": scores}
    from .outputs import write_text

    return write_text(out, json.dumps(record, indent=2, default=float))
