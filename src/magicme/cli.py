"""Command line: argument parsing only; each sub-command calls one stage function.

Errors a user can cause (ValueError, FileNotFoundError, FileExistsError, other OSErrors about a path,
argument parse errors) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path

from .checks import MAX_SEED  # standard library only: `--help` stays light


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2; sub-commands inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def finite_float(text: str) -> float:
    """A number; nan and inf are refused (they give black videos, not errors, deep inside torch)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def seed(text: str) -> int:
    value = integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, {MAX_SEED}], got {text}")
    return value


def port(text: str) -> int:
    value = integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port must be in [1, 65535], got {text}")
    return value


def _warn(args, message: str) -> None:
    print(f"magicme {args.command}: warning: {message}", file=sys.stderr)


def _real_weights_hint(flag: str) -> str:
    return (f"name real weights, e.g. {flag} stable-diffusion-v1-5/stable-diffusion-v1-5 (a hub id, downloaded once) "
            "or a local diffusers folder / .safetensors checkpoint")


def _warn_tiny(args, base: str, flag: str = "--base") -> None:
    """The one-line warning of every command that ran the tiny random-weight model: its output is noise.

    Said once the output is written, beside its name (bad input gets its one error line and nothing else)."""
    if base == "tiny":
        hint = _real_weights_hint(flag)
        if getattr(args, "backbone", None) == "wan":
            from .wan import DEFAULT_WAN

            hint = f"name real weights, e.g. {flag} {DEFAULT_WAN} (a hub id, downloaded once) or a local diffusers folder"
        _warn(args, f"{flag} tiny is the random-weight test model: the output is noise, not a picture; for real output {hint}")


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    return bool(action.option_strings) and not (default is None or default is False or default == "" or default is argparse.SUPPRESS)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, off, empty) or the help says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        return f"{text} (default: %(default)s)".strip() if _shows_default(action) and "default" not in text else text


class _Deprecated(argparse.Action):
    """An old spelling of an option, kept for one release: hidden from --help, stored like the new one, with a note."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated and goes in the next release; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _explicit_dests(argv: list[str]) -> set[str]:
    """The destinations of the options given on the command line (not left at their defaults)."""
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        p._defaults.clear()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            else:
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


_RECORD_TASKS = {"generate": "t2v", "v2v": "v2v", "face": "face", "upscale": "upscale", "train": "train"}
_MODEL_FLAGS = {"base", "motion_adapter", "base_config", "scheduler", "preset"}
_SPEED_FLAGS = {"dtype", "low_vram", "attention_slicing", "compile"}


def _apply_record(args, cfg):
    """With --from-record: the recorded config, the flags given on the command line overriding it (`cfg` holds
    them); the recorded input clip and device too, unless given."""
    if not getattr(args, "from_record", None):
        return cfg
    from .records import changed_inputs, read_record, rerun_config

    record = read_record(args.from_record)
    task = _RECORD_TASKS[args.command]
    if record.get("task") != task:
        raise ValueError(f"--from-record {args.from_record!r} is a {record.get('task')!r} record; magicme {args.command} reads {task!r} records")
    renames = {"identity": "identities", "no_mask": "masked", **({"prompt": "prompts", "seed": "seeds"} if task == "t2v" else {})}
    given = {renames.get(d, d) for d in args.explicit}
    given = {f"models.speed.{n}" if n in _SPEED_FLAGS else f"models.{n}" if n in _MODEL_FLAGS else n for n in given}
    try:
        out = rerun_config(record, cfg, given)
    except ValueError as e:
        raise ValueError(f"--from-record {args.from_record!r}: {e}") from None
    if record.get("device") and "device" not in args.explicit:
        import torch

        if not record["device"].startswith("cuda") or torch.cuda.is_available():
            args.device = record["device"]
        else:
            _warn(args, f"the record was made on {record['device']}, which this machine lacks: running on the CPU, so the output will differ")
    if "video" in vars(args) and "video" not in args.explicit:  # the V2V stages' input clip
        args.video = record.get("input", {}).get("path")
    for what, path in changed_inputs(record, out, getattr(args, "video", None)):
        _warn(args, f"{what} {path!r} has changed since the record was written: the output will differ")
    return out


def _required(args, dest: str):
    value = getattr(args, dest)
    if value is None:
        raise ValueError(f"--{dest.replace('_', '-')} is required (or --from-record RECORD.json)")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--base", default="tiny", help="SD-1.5-family model: hub id, diffusers folder, .safetensors file, or 'tiny' (default); or a Wan 2.x T2V diffusers model")
    g.add_argument("--backbone", default="auto", choices=["auto", "animatediff", "wan"], help="auto (default): from --base's model_index.json; --base tiny --backbone wan is the tiny Wan preset")
    g.add_argument("--motion-adapter", default=None, help="AnimateDiff motion module: hub id, diffusers folder, or a file such as mm_sd_v15_v2.ckpt / v3_sd15_mm.ckpt / a .safetensors copy (default: BASE/motion_adapter or guoyww/animatediff-motion-adapter-v1-5-2)")
    g.add_argument("--base-config", default=None, help="diffusers folder or hub id with the configs of a single-file --base")
    g.add_argument("--scheduler", default=None, help="ddim (default), euler, dpmpp-2m (= dpm), dpmpp-2m-karras; --preset fast/lcm/reference bring their own")
    g.add_argument("--preset", default="full", help="full (default); fast: AnimateDiff-Lightning 4-step draft; lcm: AnimateLCM 6-step draft; "
                   "reference: the Magic-Me reference recipe (DPM++ 2M Karras, 20 steps, CFG 8, FreeU)")
    g.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]", help="style/character LoRA (kohya/A1111 or diffusers .safetensors); repeat to mix")
    g.add_argument("--motion-lora", action="append", default=None, metavar="FILE[:SCALE]", help="AnimateDiff motion LoRA (v2_lora_ZoomIn.ckpt …); repeatable")
    g.add_argument("--freeu", nargs="?", const="sd15", default=None, metavar="B1,B2,S1,S2", help="FreeU; alone: SD-1.5's 1.5,1.6,0.9,0.2")
    g.add_argument("--clip-skip", type=integer, default=0, metavar="N", help="skip the text encoder's last N layers (1 = A1111's 'Clip skip 2')")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), fp16, bf16 or fp32")
    g.add_argument("--low-vram", action="store_true", help="fit 16×512² in 8 GB: CPU offload, VAE slicing/tiling, chunked motion modules")
    g.add_argument("--attention-slicing", action="store_true", help="diffusers' sliced attention in every spatial and motion layer (slower; SDPA is already memory-efficient)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first call, cached after)")
    g.add_argument("--compile-mode", default="max-autotune-no-cudagraphs", help="torch.compile mode (default: max-autotune-no-cudagraphs); max-autotune adds CUDA graphs (fixed sizes); also default, reduce-overhead")
    g.add_argument("--compile-cache", default=None, metavar="DIR", help="keep torch.compile's cache here across runs (default: inductor's, in the temp folder)")
    g.add_argument("--no-fuse-qkv", action="store_true", help="keep q/k/v projections separate (fused by default: one GEMM instead of three)")
    g.add_argument("--decode-chunk", type=integer, default=0, metavar="N", help="frames per VAE decode call (default: 0, as many as fit 4×512² pixels)")
    g.add_argument("--fp8", action="store_true", help="float8 linear layers on GPUs of compute capability >= 8.9 (Ada, Hopper); best with --compile")


def _model_spec(args):
    from .models import ModelSpec
    from .speed import SpeedOptions

    preset = getattr(args, "preset", "full")
    if args.scheduler is not None and preset != "full":
        raise ValueError(f"--scheduler cannot be combined with --preset {preset}: its adapter needs the scheduler it was distilled on")
    return ModelSpec(
        base=args.base, motion_adapter=args.motion_adapter, base_config=args.base_config,
        scheduler=args.scheduler or "ddim", preset=preset, backbone=getattr(args, "backbone", "auto"),
        speed=SpeedOptions(dtype=args.dtype, low_vram=args.low_vram, attention_slicing=args.attention_slicing, compile=args.compile,
                           compile_mode=args.compile_mode, compile_cache=args.compile_cache, fuse_qkv=not args.no_fuse_qkv,
                           decode_chunk=args.decode_chunk, fp8=args.fp8),
        loras=tuple(args.lora or ()), motion_loras=tuple(args.motion_lora or ()), freeu=_freeu(args.freeu),
        clip_skip=args.clip_skip,
    )


def _freeu(text: str | None):
    """--freeu alone → SD-1.5's values; --freeu B1,B2,S1,S2 → those four numbers."""
    if text is None or text == "sd15":
        return None if text is None else True
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--freeu takes four comma-separated numbers B1,B2,S1,S2, got {text!r}") from None


def _identities(args) -> list[str]:
    from .identity import with_token

    return with_token(args.identity or [], getattr(args, "token", None))


def cmd_generate(args) -> None:
    from .generate import GenerateConfig, generate
    from .long_video import parse_prompt_at
    from .wan_generate import default_clip

    models = _model_spec(args)
    frames, fps = default_clip(models)
    cfg = GenerateConfig(
        prompts=args.prompt or [],
        negative_prompt=args.negative_prompt,
        seeds=args.seed or [0],
        frames=frames if args.frames is None else args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        gamma=args.gamma,
        fps=fps if args.fps is None else args.fps,
        identities=_identities(args),
        models=models,
        prompt_at=parse_prompt_at(args.prompt_at or []),
        context_length=args.context_length,
        context_stride=args.context_stride,
        window_weighting=args.window_weighting,
        free_init=args.free_init,
    )
    cfg = _apply_record(args, cfg)
    for path in generate(cfg, args.out, quiet=args.quiet, device=args.device):
        print(path)
    _warn_tiny(args, cfg.models.base)


def cmd_prepare(args) -> None:
    from .prepare import PrepareConfig, prepare_identity_set
    from .segment import SegmenterConfig

    seg = SegmenterConfig(method=args.segmenter, detector=args.detector, sam=args.sam, box_threshold=args.box_threshold, device=args.device)
    cfg = PrepareConfig(images=args.images, class_word=args.class_word, out=args.out, masks=args.masks, resolution=args.resolution, segmenter=seg)
    out = prepare_identity_set(cfg, quiet=args.quiet)
    manifest = __import__("json").loads((out / "manifest.json").read_text())
    print(f"masks: {manifest['segmentation']}")
    for item in manifest["items"]:
        note = f" ({item['note']})" if item["note"] else ""
        print(f"  {item['image']}: {item['mask_method']}, subject {item['mask_area']:.0%} of the image{note}")
    print(f"wrote {out} ({len(manifest['items'])} images); check the masks in {out / 'contact_sheet.png'}")


def cmd_train(args) -> None:
    from .models import ModelSpec
    from .train import TrainConfig, train

    settings = dict(
        data=args.data,
        token=args.token,
        class_word=args.class_word,
        num_vectors=args.num_vectors,
        steps=args.steps,
        **({"lr": args.lr} if args.lr is not None else {}),
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        masked=not args.no_mask,
        resolution=args.resolution,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        mixed_precision=args.mixed_precision,
        out=args.out,
        resume=args.resume,
        models=ModelSpec(base=args.base, base_config=args.base_config, loras=tuple(args.lora or ()), backbone=args.backbone),
    )
    if settings["models"].resolved_backbone() == "wan":
        from .wan_train import WanTrainConfig

        cfg = WanTrainConfig(**settings, form=args.form, lora_rank=args.lora_rank)
    elif args.form != "tokens":
        raise ValueError(f"--form {args.form} is for the Wan backbone; an AnimateDiff identity is ID tokens")
    else:
        cfg = TrainConfig(**settings)
    cfg = _apply_record(args, cfg)
    _required(cfg, "data")
    res = train(cfg, quiet=args.quiet, device=args.device)
    _warn_tiny(args, cfg.models.base)
    print(f"masked loss on the identity set: {res.loss_start:.4f} -> {res.loss_end:.4f}")
    what = f"LoRA rank {cfg.lora_rank}" if getattr(cfg, "form", "tokens") == "lora" else f"{cfg.num_vectors} vectors; the paper's is 16 KB"
    print(f"wrote {res.path} ({res.size_bytes / 1024:.1f} KB, {what})")
    print(f'use it: magicme generate --identity {res.path} --prompt "a {cfg.token} ... "')


def _v2v_settings(args) -> dict:
    """Arguments shared by the V2V stages (v2v, face, upscale)."""
    models = _model_spec(args)
    return dict(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        strength=args.strength,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        gamma=args.gamma,
        fps=args.fps,
        context=args.context,
        identities=_identities(args),
        models=models,
    )


def _v2v_config(args, cfg):
    """A V2V stage's config after --from-record, with its prompt and input checked as required."""
    cfg = _apply_record(args, cfg)
    _required(cfg, "prompt")
    _required(args, "video")
    return cfg


def cmd_v2v(args) -> None:
    from .v2v import V2VConfig, v2v

    cfg = _v2v_config(args, V2VConfig(**_v2v_settings(args)))
    print(v2v(cfg, args.video, args.out, quiet=args.quiet, device=args.device))
    _warn_tiny(args, cfg.models.base)


def cmd_face(args) -> None:
    from .face import FaceConfig, face_vcd

    cfg = _v2v_config(args, FaceConfig(
        **_v2v_settings(args), detector=args.detector, min_face=args.min_face, min_track=args.min_track,
        min_score=args.min_score, face_size=args.face_size, margin=args.margin, feather=args.feather, smooth=args.smooth,
    ))
    print(face_vcd(cfg, args.video, args.out, quiet=args.quiet, device=args.device))
    _warn_tiny(args, cfg.models.base)


def cmd_upscale(args) -> None:
    from .upscale import UpscaleConfig, tiled_vcd

    cfg = _v2v_config(args, UpscaleConfig(
        **_v2v_settings(args), scale=args.scale, upscaler=args.upscaler, tile=args.tile, overlap=args.overlap,
        tile_batch=args.tile_batch, controlnet=args.controlnet, controlnet_scale=args.controlnet_scale,
    ))
    print(tiled_vcd(cfg, args.video, args.out, quiet=args.quiet, device=args.device))
    _warn_tiny(args, cfg.models.base)


def _add_from_record(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-record", metavar="RECORD.json", default=None,
                   help="repeat the run of a run record (the .json beside an output): its settings, models, dtype, device "
                        "and input; flags given here override them")


def _add_v2v_args(p: argparse.ArgumentParser, strength: float, out: str) -> None:
    p.add_argument("--video", default=None, help="input clip: .mp4, .gif, or a folder of image frames (required unless --from-record)")
    p.add_argument("--prompt", default=None, help="prompt; must contain the identity token when --identity is given (required unless --from-record)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--identity", action="append", metavar="[TOKEN=]FILE", help="identity from 'magicme train', or another tool's embedding (.pt/.bin/.safetensors); repeat for several subjects")
    p.add_argument("--token", default=None, help="the word for the one --identity file that names none (the reference Magic-Me .pt)")
    p.add_argument("--strength", type=finite_float, default=strength, help=f"fraction of the schedule re-run, in (0, 1] (default {strength})")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--steps", type=integer, default=25, help="steps of the full schedule; int(steps × strength) are run")
    p.add_argument("--guidance", type=finite_float, default=7.5)
    p.add_argument("--gamma", type=finite_float, default=0.15, help="noise prior frame covariance γ in [0, 1) (paper: 0.15)")
    p.add_argument("--fps", type=integer, default=None, help="default: the input clip's frame rate (8 where it does not say)")
    p.add_argument("--context", type=integer, default=16, help="frames denoised together (AnimateDiff's context; longer clips go in overlapping, blended windows)")
    p.add_argument("--out", default=out, help=".mp4, .gif, or a folder name for PNG frames")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_from_record(p)
    _add_model_args(p)


def cmd_identity_info(args) -> None:
    import json

    from .identity import describe_identity

    info = describe_identity(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        shown = value if value not in ("", None) else "(none)"
        if key == "token" and not value:
            shown = "(none: pass --token, or TOKEN=FILE)"
        print(f"{key:>16}: {shown}")


def cmd_identity_convert(args) -> None:
    from .identity import convert_identity

    print(convert_identity(args.src, args.out, token=args.token, class_word=args.class_word))


def cmd_tiny_model_save(args) -> None:
    from .models import save_tiny_model
    from .wan import save_tiny_wan_model

    print(save_tiny_wan_model(args.dir) if args.backbone == "wan" else save_tiny_model(args.dir))


def cmd_run(args) -> None:
    from .run import chain_summary, load_chain_config, run_chain

    cfg = load_chain_config(args.config, work_dir=str(Path(args.work_dir).resolve()) if args.work_dir else None)
    result = run_chain(cfg, quiet=args.quiet, device=args.device)
    print(f"done: ran {len(result.ran)} of {len(result.runs)} stages")
    print(chain_summary(result))
    _warn_tiny(args, cfg.models.base, flag="models.base:")


def cmd_demo(args) -> None:
    from .demo import demo
    from .run import chain_summary

    result = demo(args.work_dir, quiet=args.quiet)
    print(f"done: the demo's chain in {result.work_dir}")
    print(chain_summary(result))
    _warn(args, "the demo ran the tiny random-weight test model, so its videos are noise; the same chain runs for real "
                f"with `magicme run`: {_real_weights_hint('models.base:')}")


def cmd_ui(args) -> None:
    try:
        import gradio  # noqa: F401  (an optional extra)
    except ModuleNotFoundError:
        raise ValueError("magicme ui needs gradio: pip install 'magicme[ui]'") from None
    from .ui_server import AUTH_ENV, read_auth, serve

    auth = read_auth(args.auth, args.auth_file, os.environ.get(AUTH_ENV))
    serve(args.workdir, host=args.host, port=args.port, device=args.device, auth=auth, allow_hosts=args.allow_host or (),
          shared=args.shared)


def _metric_models(args):
    from .evaluate import MetricModels

    return MetricModels(clip=args.clip_model, dino=args.dino_model, batch_size=args.batch_size)


def _add_metric_args(p: argparse.ArgumentParser, from_file: bool = False) -> None:
    """Metric-model flags; with `from_file` (the suite) an absent flag keeps the subjects file's value."""
    where = ", or the subjects file's" if from_file else ""
    g = p.add_argument_group("metric models")
    g.add_argument("--clip-model", default=None if from_file else "openai/clip-vit-base-patch32",
                   help=f"CLIP for CLIP-I/CLIP-T: hub id, folder, or 'tiny' (random weights, offline) (default openai/clip-vit-base-patch32{where})")
    g.add_argument("--dino-model", default=None if from_file else "facebook/dino-vits16",
                   help=f"ViT or DINOv2 for the DINO metric, e.g. facebook/dinov2-small, or 'tiny' (default facebook/dino-vits16{where})")
    g.add_argument("--batch-size", type=integer, default=None if from_file else 32, help=f"frames per forward pass (default 32{where})")
    g.add_argument("--face-score", choices=("auto", "on", "off"), default=None if from_file else "auto",
                   help="face identity (dlib 128-D descriptor): auto = for people when the [faces] extra is installed "
                        f"(default auto{where})")
    g.add_argument("--face-model", default=None, help="face identity with OpenCV instead: SFace .onnx (cv2.FaceRecognizerSF); needs --face-detector")
    g.add_argument("--face-detector", default=None, help="YuNet .onnx (cv2.FaceDetectorYN) that finds the face for --face-model")


def cmd_evaluate(args) -> None:
    import json

    from .evaluate import evaluate_video, face_embedder

    face = face_embedder(args.face_model, args.face_detector) if args.face_score != "off" else None
    row = evaluate_video(args.video, args.references, args.prompt, token=args.token, class_word=args.class_word or "",
                         identity=args.identity, models=_metric_models(args), device=args.device, face=face,
                         face_score=args.face_score)
    print(json.dumps(row, indent=2))
    if "tiny" in (args.clip_model, args.dino_model):
        _warn(args, "'tiny' metric models have random weights: the scores mean nothing")


def cmd_evaluate_suite(args) -> None:
    from .suite import backbone_paths, load_suites, run_suite, suite_overrides

    suites = load_suites(args.subjects, **suite_overrides(backbone=args.backbone,
        seeds=args.seed, gamma=args.gamma, frames=args.frames, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, base=args.base, motion_adapter=args.motion_adapter,
        base_config=args.base_config, scheduler=args.scheduler, clip_model=args.clip_model, dino_model=args.dino_model,
        batch_size=args.batch_size, face_model=args.face_model, face_detector=args.face_detector,
        face_score=args.face_score, video_format=args.video_format, dtype=args.dtype,
    ))
    runs = []
    for name, cfg in suites.items():  # one configuration per `backbones:` entry, each in its own results file
        results, videos = backbone_paths(args.results, args.videos, name)
        run = run_suite(cfg, results, videos=videos, quiet=args.quiet, device=args.device)
        print(f"{name + ': ' if name else ''}process {run.process_index}/{run.num_processes}: scored {run.scored} new videos; "
              f"{run.results} holds {run.rows} rows", file=sys.stderr)
        runs.append(run)
    if runs[0].process_index != 0:
        return
    from .report import summary, write_report

    labels = list(suites) if len(suites) > 1 else None
    if all(r.rows for r in runs):
        print(summary([r.results for r in runs], labels))
    if labels and all(r.rows for r in runs):  # the backbones side by side in one report
        print(write_report([r.results for r in runs], Path(args.results).with_suffix(".report"), labels=labels)["markdown"])
    for run in runs:
        print(run.results)
    _warn_tiny(args, next(iter(suites.values())).models.base)


def cmd_report(args) -> None:
    from .report import write_report

    paths = write_report(args.results, args.out, labels=args.label, max_videos=args.max_videos)
    print(paths["markdown"])
    print(paths["html"])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="magicme", description="Identity-specific video generation (Magic-Me / VCD).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('magicme').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="text-to-video with the 3D Gaussian noise prior (T2V VCD)")
    p.add_argument("--prompt", action="append", help="prompt; repeat for several prompts (required unless --prompt-at 0:...)")
    p.add_argument("--prompt-at", action="append", metavar="FRAME:PROMPT", help="prompt from FRAME on, blended from the one before (prompt travel); repeat")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=seed, action="append", help="seed; repeat for several seeds (default 0)")
    p.add_argument("--frames", type=integer, default=None, help="frames (default: 16; Wan: 81, and any count runs as the next 1 + 4k)")
    p.add_argument("--height", type=integer, default=None, help="pixels, multiple of 8 (default: the model's, 512 for SD-1.5)")
    p.add_argument("--width", type=integer, default=None)
    p.add_argument("--steps", type=integer, default=None, help="denoising steps (default: the preset's: 25 full, 4 fast, 6 lcm)")
    p.add_argument("--guidance", type=finite_float, default=None, help="CFG scale (default: the preset's: 7.5 full, 1.0 fast, 1.5 lcm)")
    p.add_argument("--gamma", type=finite_float, default=0.15, help="noise prior frame covariance γ in [0, 1) (paper: 0.15)")
    p.add_argument("--fps", type=integer, default=None, help="default: 8; Wan: 16")
    w = p.add_argument_group("long videos (FreeNoise windows; on by themselves past 16 frames)")
    w.add_argument("--context-length", type=integer, default=None, help="frames per window (default 16, the motion module's)")
    w.add_argument("--context-stride", type=integer, default=4, help="frames between window starts (default 4)")
    w.add_argument("--window-weighting", default="pyramid", help="pyramid (default), flat or delayed_reverse_sawtooth")
    p.add_argument("--free-init", type=integer, default=None, metavar="N", help="FreeInit with N iterations (N× the time), to compare with the noise prior")
    p.add_argument("--identity", action="append", metavar="[TOKEN=]FILE", help="identity from 'magicme train', or another tool's embedding (.pt/.bin/.safetensors); repeat for several subjects")
    p.add_argument("--token", default=None, help="the word for the one --identity file that names none (the reference Magic-Me .pt)")
    p.add_argument("--out", default="magicme.mp4", help=".mp4, .gif, or a folder name for PNG frames")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_from_record(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prepare", help="identity set: square crops of the reference photos with subject masks")
    p.add_argument("--images", required=True, help="folder of 1-N photos of the subject (jpg/png/webp)")
    p.add_argument("--class-word", required=True, help="what the subject is: dog, woman, teddy bear ...")
    p.add_argument("--out", default="prepared", help="output folder (default: prepared)")
    p.add_argument("--masks", default=None, help="folder of your own masks, one per image with the same stem (white = subject)")
    p.add_argument("--resolution", type=integer, default=512, help="side of the square images (default 512)")
    p.add_argument("--segmenter", default="auto", help="auto (Grounding DINO + SAM, else GrabCut), grounded-sam, grabcut")
    p.add_argument("--detector", default="IDEA-Research/grounding-dino-tiny", help="Grounding DINO: hub id or folder")
    p.add_argument("--sam", default="facebook/sam-vit-base", help="SAM: hub id or folder")
    p.add_argument("--box-threshold", type=finite_float, default=0.25)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="learn an identity: extended ID tokens with the masked loss")
    p.add_argument("--data", default=None, help="folder written by 'magicme prepare' (required unless --from-record)")
    p.add_argument("--token", default="<v*>", help="the identity's word in prompts (default <v*>)")
    p.add_argument("--class-word", default=None, help="default: the prepared set's")
    p.add_argument("--num-vectors", type=integer, default=4)
    p.add_argument("--steps", type=integer, default=200)
    p.add_argument("--lr", type=finite_float, default=None, help="default: 0.001 (§5.2); a Wan LoRA: 0.0001")
    p.add_argument("--batch-size", type=integer, default=4)
    p.add_argument("--micro-batch", type=integer, default=None, help="accumulate gradients over micro-batches of this size (default: whole batch, halved on out-of-memory)")
    p.add_argument("--no-mask", action="store_true", help="loss on the whole image (the paper's ablation)")
    p.add_argument("--resolution", type=integer, default=None, help="training resolution (default: the base model's)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--checkpoint-every", type=integer, default=50, help="steps between checkpoints with validation frames (0: none)")
    p.add_argument("--mixed-precision", default="auto", help="auto, no, fp16, bf16")
    p.add_argument("--out", default="id.safetensors")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from a checkpoint folder (default: the latest beside --out)")
    p.add_argument("--base", default="tiny", help="SD-1.5-family model: hub id, diffusers folder, .safetensors file, or 'tiny'; or a Wan 2.x T2V diffusers model")
    p.add_argument("--base-config", default=None, help="diffusers folder or hub id with the configs of a single-file --base")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]", help="train with this LoRA active (optional; the identity is then tuned to the LoRA'd model)")
    p.add_argument("--backbone", default="auto", choices=["auto", "animatediff", "wan"], help="auto (default): from --base's model_index.json; --base tiny --backbone wan is the tiny Wan preset")
    p.add_argument("--form", default="tokens", choices=["tokens", "lora"], help="Wan: tokens (extended ID tokens in UMT5, default) or lora (masked-loss LoRA on the transformer's attention)")
    p.add_argument("--lora-rank", type=integer, default=16, help="Wan --form lora: LoRA rank (alpha = rank)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_from_record(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("v2v", help="partially denoise a clip with the identity and the noise prior (V2V VCD)")
    _add_v2v_args(p, strength=0.5, out="magicme-v2v.mp4")
    p.set_defaults(func=cmd_v2v)

    p = sub.add_parser("face", help="re-render the faces of a clip at full resolution with the identity (Face VCD)")
    _add_v2v_args(p, strength=0.8, out="magicme-face.mp4")
    p.add_argument("--detector", default="hog", metavar="hog|cnn|haar|FILE.onnx",
                   help="face detector: dlib's HOG (default) or MMOD CNN (small and turned faces; slow on a CPU), "
                        "OpenCV's Haar cascade, or an OpenCV YuNet .onnx file")
    p.add_argument("--min-face", type=finite_float, default=24, help="smallest face looked for, in pixels (frames are upscaled for it)")
    p.add_argument("--min-track", type=integer, default=3, help="frames a face must be seen in before it is re-rendered")
    p.add_argument("--min-score", type=finite_float, default=None, help="mean detector confidence a face track needs (default: the detector's)")
    p.add_argument("--face-size", type=integer, default=None, help="side the face clip is denoised at (default: the model's, 512)")
    p.add_argument("--margin", type=finite_float, default=0.3, help="crop side = face side × (1 + 2·margin)")
    p.add_argument("--feather", type=finite_float, default=0.15, help="feathered paste edge, fraction of the crop side")
    p.add_argument("--smooth", type=finite_float, default=2.0, help="σ in frames of the face-box smoothing (0: none)")
    p.set_defaults(func=cmd_face)

    p = sub.add_parser("upscale", help="upscale a clip and restore detail tile by tile with the identity (Tiled VCD)")
    _add_v2v_args(p, strength=0.2, out="magicme-upscaled.mp4")
    p.add_argument("--scale", type=integer, default=2, help="2 or 4")
    p.add_argument("--upscaler", default=None, help="ESRGAN/Real-ESRGAN RRDBNet .pth or .safetensors (default: Lanczos)")
    p.add_argument("--tile", type=integer, default=None, help="tile side in px, multiple of 8 (default: the model's, 512); the fewest tiles, widened by < --overlap to share it")
    p.add_argument("--overlap", type=integer, default=None, help="tile overlap in px (default: tile / 8)")
    p.add_argument("--tile-batch", type=integer, default=4, help="tiles denoised together (peak memory grows with it)")
    p.add_argument("--controlnet", default=None, help="ControlNet Tile: hub id or folder (default: lllyasviel/control_v11f1e_sd15_tile); none: without")
    p.add_argument("--controlnet-scale", type=finite_float, default=1.0)
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("evaluate", help="score one video: CLIP-I, DINO, CLIP-T, temporal consistency (paper §5.2)")
    p.add_argument("--video", required=True, help=".mp4/.gif or a folder of frames")
    p.add_argument("--references", required=True, help="folder of the subject's reference images")
    p.add_argument("--prompt", required=True, help="the prompt the video was made from")
    p.add_argument("--identity", default=None, help="identity .safetensors: gives --token and --class-word")
    p.add_argument("--token", default=None, help="identity token in the prompt, replaced by --class-word for CLIP-T")
    p.add_argument("--class-word", default=None, help="the subject's class, e.g. dog")
    p.add_argument("--device", default=None, help="cpu, cuda … (default: cuda when available)")
    _add_metric_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("evaluate-suite", help="the paper's protocol: subjects × prompts × seeds → generate → score (JSONL)")
    p.add_argument("--subjects", required=True, help="subjects YAML (identity, references, class word, prompts per subject)")
    p.add_argument("--results", default="results.jsonl", help="JSONL, one row per video; an existing file is resumed")
    p.add_argument("--videos", default=None, help="folder for the generated clips (default: RESULTS.videos/)")
    p.add_argument("--seed", type=seed, action="append", help="repeat; overrides the file's seeds (paper: 0 1 2 3)")
    p.add_argument("--gamma", type=finite_float, default=None, help="noise prior γ; 0 = the 'w/o noise prior' ablation")
    p.add_argument("--frames", type=integer, default=None)
    p.add_argument("--steps", type=integer, default=None)
    p.add_argument("--guidance", type=finite_float, default=None)
    p.add_argument("--height", type=integer, default=None)
    p.add_argument("--width", type=integer, default=None)
    p.add_argument("--video-format", default=None, choices=["mp4", "gif"], help="clip format (default mp4)")
    p.add_argument("--quiet", action="store_true")
    _add_metric_args(p, from_file=True)
    g = p.add_argument_group("models (default: the subjects file's, else the tiny preset)")
    g.add_argument("--base", default=None)
    g.add_argument("--motion-adapter", default=None)
    g.add_argument("--base-config", default=None)
    g.add_argument("--scheduler", default=None)
    g.add_argument("--backbone", default=None, choices=["auto", "animatediff", "wan"], help="default: the subjects file's (auto: from --base)")
    g.add_argument("--device", default=None, help="default: this process's accelerate device")
    g.add_argument("--dtype", default=None, help="auto (fp16 on CUDA, fp32 on CPU), fp16, bf16, fp32; part of the configuration")
    p.set_defaults(func=cmd_evaluate_suite)

    p = sub.add_parser("report", help="Markdown + HTML report of results files: Table-1 layout, γ sweep plot, contact sheets")
    p.add_argument("--results", action="append", required=True, help="results JSONL; repeat to compare configurations")
    p.add_argument("--label", action="append", default=None, help="column name per --results (default: file name)")
    p.add_argument("--out", default="report", help="output folder")
    p.add_argument("--max-videos", type=integer, default=64, help="videos per contact sheet")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="the whole chain from one YAML/TOML config: prepare → train → generate → face → upscale → evaluate")
    p.add_argument("--config", required=True, help="YAML or TOML run config (see the README)")
    p.add_argument("--work-dir", default=None, help="override the config's work_dir (relative to the current folder)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("identity", help="inspect or convert identity files (magicme's, the reference Magic-Me .pt, A1111, diffusers)")
    ident = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = ident.add_parser("info", help="token, vectors, width, base model, format of an identity or embedding file")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_identity_info)
    s = ident.add_parser("convert", help="write any supported embedding as a magicme identity .safetensors")
    s.add_argument("src", metavar="IN")
    s.add_argument("out", metavar="OUT")
    s.add_argument("--token", default=None, help="the word to use (required where IN names none)")
    s.add_argument("--class-word", default=None, help="the subject's class, e.g. man (for CLIP-T and prompt hints)")
    s.set_defaults(func=cmd_identity_convert)

    p = sub.add_parser("tiny-model", help="the tiny random-weight preset")
    tiny = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = tiny.add_parser("save", help="write it as a stock diffusers folder plus DIR/motion_adapter")
    s.add_argument("dir")
    s.add_argument("--backbone", default="animatediff", choices=["animatediff", "wan"], help="wan: the tiny Wan preset, a stock WanPipeline folder")
    s.set_defaults(func=cmd_tiny_model_save)

    p = sub.add_parser("demo", help="the main job on the tiny preset, offline")
    p.add_argument("--work-dir", default="magicme-demo", help="folder for the sample photos, the config and every output")
    p.add_argument("--out-dir", dest="work_dir", action=_Deprecated, new="--work-dir")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ui", help="the whole workflow in a browser (Gradio web app)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: every interface, use --auth)")
    p.add_argument("--port", type=port, default=7860)
    p.add_argument("--work-dir", dest="workdir", default="magicme-ui", help="folder whose workspaces/ holds uploads, identities and videos (created)")
    p.add_argument("--workdir", dest="workdir", action=_Deprecated, new="--work-dir")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--auth", action="append", metavar="USER:PASSWORD", help="require this login (repeatable; keeps it in shell history: prefer --auth-file or $MAGICME_UI_AUTH)")
    p.add_argument("--auth-file", metavar="FILE", help="logins, one USER:PASSWORD per line")
    p.add_argument("--allow-host", action="append", metavar="NAME", help="also answer requests addressed to this host name (repeatable; '*': no Host check, behind a proxy that checks)")
    p.add_argument("--shared", action="store_true", help="one workspace for every browser (default: one per browser, or per login with --auth)")
    p.set_defaults(func=cmd_ui)
    stack = [parser]
    while stack:  # every sub-command's --help shows the defaults
        p = stack.pop()
        p.formatter_class = _HelpFormatter
        for action in p._actions:
            if action.help is None and _shows_default(action):  # argparse prints no help line at all for help=None
                action.help = "(default: %(default)s)"
        stack.extend(c for a in p._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices.values())
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or an argument error (one line, already printed)
        return e.code if isinstance(e.code, int) else 2
    args.explicit = _explicit_dests(sys.argv[1:] if argv is None else argv) if getattr(args, "from_record", None) else set()
    # the libraries' notices (torchvision fallbacks, embedding resizes, dtype casts) are not the user's concern;
    # magicme's own warnings still print. Set in main, not at import, and only where the user chose no level.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        if getattr(args, "device", None) is not None:  # an absent GPU fails now, not after the work before it
            from .models import pick_device

            pick_device(args.device)
        from .progress import library_bars_off

        with library_bars_off() if getattr(args, "quiet", False) else contextlib.nullcontext():
            args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"magicme {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a full disk, a name too long: about a path the user named
        where = f": {e.filename!r}" if e.filename else ""
        print(f"magicme {args.command}: error: {e.strerror or _one_line(e)}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"magicme {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _one_line(e: BaseException) -> str:
    """The error's message on one line (a library's multi-line message is joined, not cut)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
