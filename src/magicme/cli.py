"""Command line: argument parsing only; each sub-command calls one stage function.

Errors a user can cause (ValueError, FileNotFoundError, FileExistsError) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--base", default="tiny", help="SD-1.5-family model: hub id, diffusers folder, .safetensors file, or 'tiny' (default)")
    g.add_argument("--motion-adapter", default=None, help="AnimateDiff MotionAdapter: hub id or folder (default: BASE/motion_adapter or guoyww/animatediff-motion-adapter-v1-5-2)")
    g.add_argument("--base-config", default=None, help="diffusers folder or hub id with the configs of a single-file --base")
    g.add_argument("--scheduler", default="ddim", help="ddim (default), euler or dpm")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")


def _model_spec(args):
    from .models import ModelSpec

    return ModelSpec(base=args.base, motion_adapter=args.motion_adapter, base_config=args.base_config, scheduler=args.scheduler)


def cmd_generate(args) -> None:
    from .generate import GenerateConfig, generate

    cfg = GenerateConfig(
        prompts=args.prompt,
        negative_prompt=args.negative_prompt,
        seeds=args.seed or [0],
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance=args.guidance,
        gamma=args.gamma,
        fps=args.fps,
        identities=args.identity or [],
        models=_model_spec(args),
    )
    for path in generate(cfg, args.out, quiet=args.quiet, device=args.device):
        print(path)


def cmd_prepare(args) -> None:
    from .prepare import PrepareConfig, prepare_identity_set
    from .segment import SegmenterConfig

    seg = SegmenterConfig(method=args.segmenter, detector=args.detector, sam=args.sam, box_threshold=args.box_threshold, device=args.device)
    cfg = PrepareConfig(images=args.images, class_word=args.class_word, out=args.out, masks=args.masks, resolution=args.resolution, segmenter=seg)
    out = prepare_identity_set(cfg)
    manifest = __import__("json").loads((out / "manifest.json").read_text())
    print(f"masks: {manifest['segmentation']}")
    for item in manifest["items"]:
        note = f" ({item['note']})" if item["note"] else ""
        print(f"  {item['image']}: {item['mask_method']}, subject {item['mask_area']:.0%} of the image{note}")
    print(f"wrote {out} ({len(manifest['items'])} images); check the masks in {out / 'contact_sheet.png'}")


def cmd_train(args) -> None:
    from .models import ModelSpec
    from .train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data,
        token=args.token,
        class_word=args.class_word,
        num_vectors=args.num_vectors,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        micro_batch=args.micro_batch,
        masked=not args.no_mask,
        resolution=args.resolution,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        mixed_precision=args.mixed_precision,
        out=args.out,
        resume=args.resume,
        models=ModelSpec(base=args.base, base_config=args.base_config),
    )
    res = train(cfg, quiet=args.quiet, device=args.device)
    print(f"masked loss on the identity set: {res.loss_start:.4f} -> {res.loss_end:.4f}")
    print(f"wrote {res.path} ({res.size_bytes / 1024:.1f} KB, {cfg.num_vectors} vectors; the paper's is 16 KB)")
    print(f'use it: magicme generate --identity {res.path} --prompt "a {cfg.token} ... "')


def cmd_tiny_model_save(args) -> None:
    from .models import save_tiny_model

    print(save_tiny_model(args.dir))


def cmd_demo(args) -> None:
    from .demo import demo

    for path in demo(args.out_dir, quiet=args.quiet):
        print(f"wrote {path}")
    print("(tiny preset: random weights, so the video is noise; see the README for real weights)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magicme", description="Identity-specific video generation (Magic-Me / VCD).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('magicme').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="text-to-video with the 3D Gaussian noise prior (T2V VCD)")
    p.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several prompts")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, action="append", help="seed; repeat for several seeds (default 0)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 8 (default: the model's, 512 for SD-1.5)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--gamma", type=float, default=0.15, help="noise prior frame covariance γ in [0, 1) (paper: 0.15)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--identity", action="append", help="identity .safetensors from 'magicme train'; repeat for several subjects")
    p.add_argument("--out", default="magicme.mp4", help=".mp4, .gif, or a folder name for PNG frames")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prepare", help="identity set: square crops of the reference photos with subject masks")
    p.add_argument("--images", required=True, help="folder of 1-N photos of the subject (jpg/png/webp)")
    p.add_argument("--class-word", required=True, help="what the subject is: dog, woman, teddy bear ...")
    p.add_argument("--out", default="prepared", help="output folder (default: prepared)")
    p.add_argument("--masks", default=None, help="folder of your own masks, one per image with the same stem (white = subject)")
    p.add_argument("--resolution", type=int, default=512, help="side of the square images (default 512)")
    p.add_argument("--segmenter", default="auto", help="auto (Grounding DINO + SAM, else GrabCut), grounded-sam, grabcut")
    p.add_argument("--detector", default="IDEA-Research/grounding-dino-tiny", help="Grounding DINO: hub id or folder")
    p.add_argument("--sam", default="facebook/sam-vit-base", help="SAM: hub id or folder")
    p.add_argument("--box-threshold", type=float, default=0.25)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="learn an identity: extended ID tokens with the masked loss")
    p.add_argument("--data", required=True, help="folder written by 'magicme prepare'")
    p.add_argument("--token", default="<v*>", help="the identity's word in prompts (default <v*>)")
    p.add_argument("--class-word", default=None, help="default: the prepared set's")
    p.add_argument("--num-vectors", type=int, default=4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=None, help="accumulate gradients over micro-batches of this size (default: whole batch, halved on out-of-memory)")
    p.add_argument("--no-mask", action="store_true", help="loss on the whole image (the paper's ablation)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: the base model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints with validation frames (0: none)")
    p.add_argument("--mixed-precision", default="auto", help="auto, no, fp16, bf16")
    p.add_argument("--out", default="id.safetensors")
    p.add_argument("--resume", nargs="?", const="latest", default=None, help="continue from a checkpoint folder (default: the latest beside --out)")
    p.add_argument("--base", default="tiny", help="SD-1.5-family model: hub id, diffusers folder, .safetensors file, or 'tiny'")
    p.add_argument("--base-config", default=None, help="diffusers folder or hub id with the configs of a single-file --base")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tiny-model", help="the tiny random-weight preset")
    tiny = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = tiny.add_parser("save", help="write it as a stock diffusers folder plus DIR/motion_adapter")
    s.add_argument("dir")
    s.set_defaults(func=cmd_tiny_model_save)

    p = sub.add_parser("demo", help="the main job on the tiny preset, offline")
    p.add_argument("--out-dir", default="magicme-demo")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"magicme {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"magicme {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
