"""`magicme ui`: the whole workflow in a browser (Gradio), bound to loopback by default.

The handlers (`on_*`) are plain functions of a `Workspace` and the form values, so tests run them
headless; `build_app` only wires them to components. Long handlers are generators: they yield the
page's new state after each step, so progress shows live, and the Cancel button stops the job.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import gradio as gr  # this module is the web UI; the CLI imports it only for `magicme ui`

from .workspace import Cancelled, Workspace, stream, video_prompt

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7860


def config_defaults(cls) -> dict:
    """A config dataclass's plain defaults: the UI shows the ones the CLI and the Python API use."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def model_spec(base: str, motion_adapter: str, base_config: str, scheduler: str, preset: str = "full"):
    """The form's model fields as a `ModelSpec` (blank fields mean the defaults)."""
    from .models import TINY, ModelSpec

    return ModelSpec(
        base=(base or "").strip() or TINY,
        motion_adapter=(motion_adapter or "").strip() or None,
        base_config=(base_config or "").strip() or None,
        scheduler=scheduler or "ddim",
        preset=preset or "full",
    )


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


def _prompt_travel(text: str) -> dict[int, str]:
    """'FRAME: prompt' lines (blank lines skipped) as generate's `prompt_at`."""
    from .long_video import parse_prompt_at

    return parse_prompt_at([line for line in (text or "").splitlines() if line.strip()])


# ---- handlers: plain functions, run headless by the tests


def on_upload(ws: Workspace, files: list[str] | None, class_word: str) -> tuple[str, list[str], str]:
    """Store uploaded photos as a new reference set; return (set name, stored image paths, status)."""
    name = ws.save_references(files or [], class_word)
    images, record = ws.reference_set(name)
    return name, [str(p) for p in images], f"Stored {record['count']} photo(s) of a {record['class_word']} as {name}."


def on_pick_set(ws: Workspace, name: str | None) -> tuple[list[str], str]:
    """The stored photos and class word of a reference set."""
    if not name:
        return [], ""
    images, record = ws.reference_set(name)
    return [str(p) for p in images], record["class_word"]


def on_prepare(ws: Workspace, name: str | None, segmenter: str = "auto") -> tuple[str, str | None, list[tuple[str, str]]]:
    """Make the subject masks of a reference set (§4.2); return (status, contact sheet, [(mask, caption)])."""
    if not name:
        raise ValueError("reference set: save or pick a set of photos first")
    manifest = ws.prepare(name, segmenter or "auto")
    return masks_view(ws, name, manifest)


def masks_view(ws: Workspace, name: str | None, manifest: dict | None = None) -> tuple[str, str | None, list[tuple[str, str]]]:
    """What the page shows of a prepared set: status with the segmenter used, contact sheet, masks."""
    import json

    folder = ws.prepared(name) if name else None
    if folder is None:
        return ("Not prepared yet: make the masks." if name else ""), None, []
    manifest = manifest or json.loads((folder / "manifest.json").read_text())
    masks = [(str(folder / item["mask"]), f"{item['mask_method']} · {item['mask_area']:.0%} of the image") for item in manifest["items"]]
    status = f"Masks of {len(masks)} photo(s) by {manifest['segmentation']}. Check them, then train."
    return status, str(folder / "contact_sheet.png"), masks


def on_train(
    ws: Workspace,
    model: tuple[str, ...],
    name: str | None,
    token: str,
    steps,
    lr,
    num_vectors,
    masked: bool,
    seed,
    progress: Callable[[int, int], None] = lambda step, steps: None,
) -> Iterator[tuple[str, object, str | None]]:
    """Train an identity on a prepared set; yield (status, loss curve as a DataFrame, identity name or None)."""
    import pandas as pd

    from .generate import GenerateConfig
    from .train import TrainConfig

    if not name:
        raise ValueError("reference set: save or pick a set of photos first")
    cfg = TrainConfig(
        data="",
        token=(token or "").strip(),
        steps=_int(steps, "steps"),
        lr=_float(lr, "learning rate"),
        num_vectors=_int(num_vectors, "vectors"),
        masked=bool(masked),
        seed=_int(seed, "seed"),
        checkpoint_every=0,  # an interactive run: the identity file is the result
        models=model_spec(*model),
    )
    losses: list[tuple[int, float]] = []
    def curve():  # typed columns even when empty, or the plot takes them for categories
        steps, values = zip(*losses) if losses else ((), ())
        return pd.DataFrame({"step": pd.Series(steps, dtype="int64"), "loss": pd.Series(values, dtype="float64")})

    yield "Loading the model…", curve(), None
    try:
        for kind, value in stream(lambda report: ws.train(name, cfg, report)):
            if kind == "progress":
                losses.append((value["step"], value["loss"]))
                progress(value["step"], value["steps"])
                yield f"Training: step {value['step']}/{value['steps']}, loss {value['loss']:.4f}", curve(), None
            else:
                yield f"Done: identity {value} (token {cfg.token}). Use it in Generate.", curve(), value
    except Cancelled:
        yield "Cancelled; no identity was written.", curve(), None


def on_import_identity(ws: Workspace, file: str | None) -> tuple[str, str]:
    name = ws.import_identity(file)
    return name, f"Imported identity {name}."


def on_generate(
    ws: Workspace,
    model: tuple[str, ...],
    prompt: str,
    negative_prompt: str,
    identities: list[str] | None,
    gamma: float,
    frames,
    steps,
    seed,
    guidance,
    fps,
    prompt_travel: str = "",
    context_length=None,
    context_stride=4,
    window_weighting: str = "pyramid",
    free_init=None,
    progress: Callable[[int, int], None] = lambda step, steps: None,
) -> Iterator[tuple[str, str | None, dict | None]]:
    """Generate one clip; yield (status, video path or None, its settings or None) as it goes.

    Blank steps/guidance take the speed preset's; `prompt_travel` holds 'FRAME: prompt' lines; clips
    over 16 frames or with travel run in FreeNoise windows (long_video.py).
    """
    from .generate import GenerateConfig

    prompt = (prompt or "").strip()
    cfg = GenerateConfig(
        prompts=[prompt] if prompt else [],
        negative_prompt=negative_prompt or "",
        seeds=[_int(seed, "seed")],
        frames=_int(frames, "frames"),
        steps=_int(steps, "steps", optional=True),
        guidance=_float(guidance, "guidance", optional=True),
        gamma=float(gamma),
        fps=_int(fps, "fps"),
        identities=list(identities or []),
        models=model_spec(*model),
        prompt_at=_prompt_travel(prompt_travel),
        context_length=_int(context_length, "context length", optional=True),
        context_stride=_int(context_stride, "context stride"),
        window_weighting=window_weighting or "pyramid",
        free_init=_int(free_init, "FreeInit iterations", optional=True),
    )
    yield "Loading the model…", None, None
    try:
        for kind, value in stream(lambda report: ws.generate(cfg, report)):
            if kind == "progress":
                progress(value["step"], value["steps"])
                yield f"Denoising: step {value['step']}/{value['steps']}", None, None
            else:
                yield f"Done: {value}", str(ws.video_path(value)), ws.video_settings(value)
    except Cancelled:
        yield "Cancelled; nothing was written.", None, None


def on_pick_video(ws: Workspace, name: str | None) -> tuple[str | None, dict | None, dict | None]:
    """A stored video, its run record and its last scores (None if never scored)."""
    if not name:
        return None, None, None
    return str(ws.video_path(name)), ws.video_settings(name), ws.metrics(name)


def refine_defaults(ws: Workspace, name: str | None) -> tuple[str, list[str]]:
    """The prompt and identity names to refine a video with: the ones it was made with."""
    if not name:
        return "", []
    settings = ws.video_settings(name)
    return video_prompt(settings), ws.identity_names(settings)


def on_refine(
    ws: Workspace,
    model: tuple[str, ...],
    stage: str,
    video: str | None,
    prompt: str,
    identities: list[str] | None,
    strength,
    steps,
    seed,
    scale=2,
    detector=None,
) -> Iterator[tuple[str, str | None, dict | None]]:
    """Face VCD or Tiled VCD (upscale) on a stored video (paper §4.3); yield (status, new video, its settings).

    A blank strength takes the stage's paper default (0.8 face, 0.2 upscale, §5.2).
    """
    from .face import FaceConfig
    from .upscale import UpscaleConfig

    if not video:
        raise ValueError("video: pick a video to refine")
    common = dict(
        prompt=(prompt or "").strip(),
        seed=_int(seed, "seed"),
        steps=_int(steps, "steps"),
        identities=list(identities or []),
        models=model_spec(*model),
    )
    if _float(strength, "strength", optional=True) is not None:
        common["strength"] = _float(strength, "strength")
    if stage == "face":
        cfg = FaceConfig(**common)
    else:
        cfg = UpscaleConfig(**common, scale=_int(scale, "scale"))
    label = "Face VCD" if stage == "face" else "Tiled VCD"
    yield f"{label}: loading the model…", None, None
    try:
        for kind, value in stream(lambda report: ws.refine(stage, video, cfg, report, detector=detector)):
            if kind == "progress":
                yield f"{label}: denoising step {value['step']}", None, None
            else:
                settings = ws.video_settings(value)
                note = " (no face found: the clip is unchanged)" if stage == "face" and not settings.get("faces") else ""
                yield f"Done: {value}{note}", str(ws.video_path(value)), settings
    except Cancelled:
        yield "Cancelled; nothing was written.", None, None


def on_evaluate(ws: Workspace, video: str | None, reference_set: str | None, clip_model: str, dino_model: str) -> Iterator[tuple[str, dict | None]]:
    """Score a stored video against a reference set (paper §5.2); yield (status, scores or None)."""
    from .evaluate import MetricModels

    if not video:
        raise ValueError("video: pick a video to score")
    if not reference_set:
        raise ValueError("reference set: pick the photos to compare the video with")
    d = MetricModels()
    models = MetricModels(clip=(clip_model or "").strip() or d.clip, dino=(dino_model or "").strip() or d.dino)
    yield "Scoring…", None
    try:
        for kind, value in stream(lambda report: ws.evaluate(video, reference_set, models, report)):
            if kind == "progress":
                yield f"Scoring: {value['stage']}…", None
            else:
                yield metrics_table(value), value
    except Cancelled:
        yield "Cancelled.", None


def metrics_table(scores: dict) -> str:
    """The scores as a Markdown table in Table 1's order (higher is better for all)."""
    from .evaluate import METRICS

    names = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "temporal_dino": "T. Cons. (DINO)", "temporal_clip": "T. Cons. (CLIP)"}
    cells = [f"{scores[m]:.4f}" if isinstance(scores.get(m), float) else "—" for m in METRICS]
    return "| " + " | ".join(names[m] for m in METRICS) + " |\n|" + " --- |" * len(METRICS) + "\n| " + " | ".join(cells) + " |"


def video_choices(ws: Workspace) -> list[tuple[str, str]]:
    """(label, name) per stored video, newest first; the label starts with its prompt."""
    out = []
    for name in ws.videos():
        settings = ws.video_settings(name)
        prompt = video_prompt(settings)
        out.append((f"{prompt[:48]}{'…' if len(prompt) > 48 else ''} · {settings.get('task', '?')} · {name}", name))
    return out


def video_gallery(ws: Workspace) -> list[tuple[str, str]]:
    """(path, caption = name) per stored video, for the gallery."""
    return [(str(ws.video_path(n)), n) for n in ws.videos()]


# ---- wiring


def build_app(workdir: str | Path = "magicme-ui", *, device: str | None = None, workspace: Workspace | None = None):
    """The Gradio app over one work directory (`gr.Blocks`, not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage pings or version checks
    from .evaluate import MetricModels
    from .long_video import WEIGHTING_SCHEMES
    from .generate import GenerateConfig
    from .models import PRESETS, SCHEDULERS
    from .segment import SEGMENTERS
    from .train import TrainConfig

    ws = workspace or Workspace(workdir, device=device)
    d = config_defaults(GenerateConfig)
    train_defaults = config_defaults(TrainConfig)

    def guarded(fn):
        """User errors become a red message on the page instead of a traceback."""
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except (ValueError, FileNotFoundError, FileExistsError) as e:
                raise gr.Error(str(e)) from None
        return run

    def guarded_stream(fn, desc: str | None = None):
        """`guarded` for generator handlers; with `desc`, their (step, steps) reports drive a progress bar."""
        def run(*args, progress=gr.Progress()):
            try:
                if desc:
                    yield from fn(*args, progress=lambda i, n: progress((i, n), desc=desc))
                else:
                    yield from fn(*args)
            except (ValueError, FileNotFoundError, FileExistsError) as e:
                raise gr.Error(str(e)) from None
        return run

    def cancel():
        """Stop the running job at its next step; its own handler then reports "Cancelled" (one writer per status)."""
        gr.Info(f"Cancelling {ws.cancel()} job(s)…")

    def sets_update(selected=None):
        names = ws.reference_sets()
        return gr.update(choices=names, value=selected if selected in names else (names[0] if names else None))

    def identities_update(selected=None):
        """New choices; the picked identities stay picked unless `selected` replaces them."""
        if selected is None:
            return gr.update(choices=ws.identities())
        return gr.update(choices=ws.identities(), value=selected)

    def videos_update(selected=None):
        choices = video_choices(ws)
        names = [n for _, n in choices]
        return gr.update(choices=choices, value=selected if selected in names else None), video_gallery(ws)

    # delete_cache: uploads and copies Gradio keeps in its own cache go after a day, checked hourly
    with gr.Blocks(title="magicme", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(
            "# magicme\nIdentity-specific video generation (Magic-Me / VCD). "
            "Upload photos of a subject → make its identity → generate videos. "
            f"Everything is stored under `{ws.root}`."
        )
        with gr.Accordion("Model", open=False):
            gr.Markdown("`tiny` is the offline random-weight preset (its videos are noise). "
                        "For real videos give an SD-1.5-family base model (hub id, folder or .safetensors) and a motion adapter.")
            with gr.Row():
                base = gr.Textbox("tiny", label="Base model", elem_id="base")
                adapter = gr.Textbox("", label="Motion adapter", placeholder="default: BASE/motion_adapter or guoyww/animatediff-motion-adapter-v1-5-2")
                base_config = gr.Textbox("", label="Base config (single-file base only)")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="ddim", label="Scheduler (full preset)")
                preset = gr.Dropdown(list(PRESETS), value="full", label="Speed preset", elem_id="preset",
                                     info="fast: AnimateDiff-Lightning 4 steps; lcm: AnimateLCM")
        model = [base, adapter, base_config, scheduler, preset]
        trained = gr.State(None)

        with gr.Tabs():
            with gr.Tab("1 · Photos & identity", id="identity"):
                with gr.Row():
                    with gr.Column():
                        photos = gr.File(label=f"Reference photos (JPEG/PNG/WebP, up to {ws.limits.max_files})",
                                         file_count="multiple", file_types=["image"], elem_id="photos")
                        class_word = gr.Textbox(label="Class word", placeholder="dog, woman, teddy bear …", elem_id="class_word")
                        upload_btn = gr.Button("Save photos", variant="primary", elem_id="save_photos")
                        upload_status = gr.Markdown(elem_id="upload_status")
                    with gr.Column():
                        ref_set = gr.Dropdown(ws.reference_sets(), label="Reference sets", elem_id="ref_set")
                        ref_images = gr.Gallery(label="Photos", columns=4, height=260, buttons=["download"], elem_id="ref_images")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**Masks** (§4.2): the subject is found by its class word (Grounding DINO + SAM when "
                                    "available, else GrabCut) and only it is learned.")
                        segmenter = gr.Dropdown(list(SEGMENTERS), value="auto", label="Segmenter")
                        prepare_btn = gr.Button("Make masks", elem_id="prepare")
                        prepare_status = gr.Markdown(elem_id="prepare_status")
                        masks = gr.Gallery(label="Masks", columns=4, height=200, buttons=["download"], elem_id="masks")
                    contact = gr.Image(label="Photos and masks", type="filepath", interactive=False, elem_id="contact_sheet")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**Train the identity** (§4.2, §5.2 defaults): extended ID tokens with the masked loss.")
                        with gr.Row():
                            token = gr.Textbox(train_defaults["token"], label="Token", elem_id="token")
                            train_steps = gr.Number(train_defaults["steps"], label="Steps", precision=0, elem_id="train_steps")
                            lr = gr.Number(train_defaults["lr"], label="Learning rate")
                        with gr.Row():
                            num_vectors = gr.Number(train_defaults["num_vectors"], label="Vectors", precision=0)
                            masked = gr.Checkbox(train_defaults["masked"], label="Masked loss")
                            train_seed = gr.Number(train_defaults["seed"], label="Seed", precision=0)
                        with gr.Row():
                            train_btn = gr.Button("Train", variant="primary", elem_id="train")
                            cancel_train = gr.Button("Cancel", variant="stop", elem_id="cancel_train")
                    with gr.Column():
                        train_status = gr.Markdown(elem_id="train_status")
                        loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=260, elem_id="loss_plot")
                with gr.Row():
                    id_file = gr.File(label="Import an identity (.safetensors)", file_types=[".safetensors"], elem_id="id_file")
                    with gr.Column():
                        import_btn = gr.Button("Import identity", elem_id="import_identity")
                        import_status = gr.Markdown()

            with gr.Tab("2 · Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a <v*> dog running on the beach", elem_id="prompt")
                        negative = gr.Textbox(d["negative_prompt"], label="Negative prompt")
                        identities = gr.Dropdown(ws.identities(), multiselect=True, label="Identities (the prompt must use their tokens)", elem_id="identities")
                        gamma = gr.Slider(0.0, 0.99, value=d["gamma"], step=0.01, label="γ: noise-prior frame correlation (paper: 0.15; 0 = stock AnimateDiff)", elem_id="gamma")
                        with gr.Row():
                            frames = gr.Number(d["frames"], label="Frames (over 16: FreeNoise windows)", precision=0, minimum=1, elem_id="frames")
                            steps = gr.Textbox("", label="Steps", placeholder="the preset's (25 full)", elem_id="steps")
                            seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                        with gr.Row():
                            guidance = gr.Textbox("", label="Guidance", placeholder="the preset's (7.5 full)", elem_id="guidance")
                            fps = gr.Number(d["fps"], label="FPS", precision=0, minimum=1)
                        with gr.Accordion("Long video and prompt travel", open=False):
                            travel = gr.Textbox(label="Prompt travel: one 'FRAME: prompt' per line", lines=3,
                                                placeholder="0: a <v*> dog walks\n24: a <v*> dog runs", elem_id="travel")
                            with gr.Row():
                                context_length = gr.Textbox("", label="Window frames", placeholder="16")
                                context_stride = gr.Number(d["context_stride"], label="Window stride", precision=0, minimum=1)
                                weighting = gr.Dropdown(list(WEIGHTING_SCHEMES), value=d["window_weighting"], label="Window blend")
                                free_init = gr.Textbox("", label="FreeInit iterations", placeholder="off")
                        with gr.Row():
                            gen_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                            cancel_gen = gr.Button("Cancel", variant="stop", elem_id="cancel_generate")
                    with gr.Column():
                        gen_status = gr.Markdown(elem_id="gen_status")
                        gen_video = gr.Video(label="Video", interactive=False, buttons=["download"], loop=True, elem_id="gen_video")
                        gen_settings = gr.JSON(label="Settings (run record)", elem_id="gen_settings")

            with gr.Tab("3 · Videos", id="videos"):
                with gr.Row():
                    with gr.Column():
                        video_pick = gr.Dropdown(video_choices(ws), label="Videos", elem_id="video_pick")
                        refresh = gr.Button("Refresh")
                        library = gr.Gallery(video_gallery(ws), label="All videos", columns=4, height=320, buttons=["download"], elem_id="library")
                    with gr.Column():
                        lib_video = gr.Video(label="Video", interactive=False, buttons=["download"], loop=True, elem_id="lib_video")
                        lib_settings = gr.JSON(label="Settings (run record)", elem_id="lib_settings")
                with gr.Accordion("Refine (paper §4.3): Face VCD and Tiled VCD upscaling of the selected video", open=True):
                    with gr.Row():
                        with gr.Column():
                            refine_prompt = gr.Textbox(label="Prompt (from the video)", lines=2, elem_id="refine_prompt")
                            refine_ids = gr.Dropdown(ws.identities(), multiselect=True, label="Identities", elem_id="refine_identities")
                            with gr.Row():
                                refine_strength = gr.Textbox("", label="Strength", placeholder="0.8 face, 0.2 upscale (§5.2)", elem_id="refine_strength")
                                refine_steps = gr.Number(25, label="Steps", precision=0, minimum=1, elem_id="refine_steps")
                                refine_seed = gr.Number(0, label="Seed", precision=0)
                                refine_scale = gr.Dropdown([2, 4], value=2, label="Upscale ×")
                            with gr.Row():
                                face_btn = gr.Button("Face VCD", variant="primary", elem_id="face_vcd")
                                upscale_btn = gr.Button("Upscale (Tiled VCD)", variant="primary", elem_id="upscale")
                                cancel_refine = gr.Button("Cancel", variant="stop", elem_id="cancel_refine")
                        with gr.Column():
                            refine_status = gr.Markdown(elem_id="refine_status")
                            refine_video = gr.Video(label="Refined video", interactive=False, buttons=["download"], loop=True, elem_id="refine_video")
                            refine_settings = gr.JSON(label="Settings (run record)", elem_id="refine_settings")
                with gr.Accordion("Metrics (paper §5.2): CLIP-I, DINO, CLIP-T, temporal consistency", open=True):
                    gr.Markdown("Scores the selected video against a reference set. Metric models: hub ids or local folders "
                                "(offline, use folders saved with `save_pretrained`).")
                    with gr.Row():
                        eval_set = gr.Dropdown(ws.reference_sets(), label="Reference set", elem_id="eval_set")
                        clip_model = gr.Textbox(MetricModels().clip, label="CLIP model", elem_id="clip_model")
                        dino_model = gr.Textbox(MetricModels().dino, label="DINO model", elem_id="dino_model")
                    with gr.Row():
                        eval_btn = gr.Button("Score", variant="primary", elem_id="evaluate")
                        cancel_eval = gr.Button("Cancel", variant="stop")
                    eval_status = gr.Markdown(elem_id="eval_status")
                    lib_metrics = gr.JSON(label="Scores", elem_id="lib_metrics")

        # photos
        def upload(files, word):
            name, images, status = on_upload(ws, files, word)
            return sets_update(name), images, status, *masks_view(ws, name)

        upload_btn.click(guarded(upload), [photos, class_word], [ref_set, ref_images, upload_status, prepare_status, contact, masks]).then(
            lambda: sets_update(), None, eval_set)
        ref_set.input(guarded(lambda n: (*on_pick_set(ws, n), *masks_view(ws, n))), ref_set,
                      [ref_images, class_word, prepare_status, contact, masks])
        prepare_btn.click(guarded(lambda n, m: on_prepare(ws, n, m)), [ref_set, segmenter], [prepare_status, contact, masks])
        train_event = train_btn.click(
            guarded_stream(lambda *a, progress: on_train(ws, a[:5], *a[5:], progress=progress), "training"),
            [*model, ref_set, token, train_steps, lr, num_vectors, masked, train_seed],
            [train_status, loss_plot, trained],
        )
        train_event.then(lambda new: (identities_update([new] if new else None), identities_update()), trained, [identities, refine_ids])
        cancel_train.click(cancel, None, None)
        import_btn.click(guarded(lambda f: on_import_identity(ws, f)[1]), id_file, import_status).then(
            lambda: (identities_update(), identities_update()), None, [identities, refine_ids])

        # generate
        gen_event = gen_btn.click(
            guarded_stream(lambda *a, progress: on_generate(ws, a[:5], *a[5:], progress=progress), "denoising"),
            [*model, prompt, negative, identities, gamma, frames, steps, seed, guidance, fps,
             travel, context_length, context_stride, weighting, free_init],
            [gen_status, gen_video, gen_settings],
        )
        gen_event.then(lambda current: videos_update(current), video_pick, [video_pick, library])
        cancel_gen.click(cancel, None, None)

        # videos
        def pick(name):
            return (*on_pick_video(ws, name), *refine_defaults(ws, name))

        picked = [lib_video, lib_settings, lib_metrics, refine_prompt, refine_ids]
        video_pick.input(guarded(pick), video_pick, picked)
        refine_inputs = [*model, video_pick, refine_prompt, refine_ids, refine_strength, refine_steps, refine_seed, refine_scale]
        for stage, btn in (("face", face_btn), ("upscale", upscale_btn)):
            btn.click(
                guarded_stream(lambda *a, stage=stage: on_refine(ws, a[:5], stage, *a[5:])),
                refine_inputs, [refine_status, refine_video, refine_settings],
            ).then(lambda current: videos_update(current), video_pick, [video_pick, library])
        cancel_refine.click(cancel, None, None)
        eval_btn.click(guarded_stream(lambda *a: on_evaluate(ws, *a)), [video_pick, eval_set, clip_model, dino_model], [eval_status, lib_metrics])
        cancel_eval.click(cancel, None, None)
        refresh.click(lambda current: videos_update(current), video_pick, [video_pick, library])

        def pick_from_gallery(evt: gr.SelectData):
            name = (evt.value or {}).get("caption") if isinstance(evt.value, dict) else None
            return gr.update(value=name), *pick(name)

        library.select(pick_from_gallery, None, [video_pick, *picked])
        app.load(lambda: (sets_update(), sets_update(), identities_update(), identities_update(), *videos_update()), None,
                 [ref_set, eval_set, identities, refine_ids, video_pick, library])

    app.magicme_workspace = ws
    return app


def check_server_args(host: str, port: int) -> None:
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"--host must be an address such as 127.0.0.1, got {host!r}")
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port!r}")


def serve(workdir: str | Path = "magicme-ui", host: str = "127.0.0.1", port: int = DEFAULT_PORT, device: str | None = None) -> None:
    """`magicme ui`: check the arguments, build the app over `workdir` and serve it until interrupted."""
    check_server_args(host, port)
    app = build_app(workdir, device=device)
    shown = f"[{host}]" if ":" in host else host
    print(f"magicme ui on http://{shown}:{port} (work directory {app.magicme_workspace.root}); Ctrl-C stops it", flush=True)
    launch(app, host=host, port=port, quiet=True)


def launch(app, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, block: bool = True, quiet: bool = False):
    """Serve `app` on host:port with nothing reaching the network (no share link, no analytics, no SSR node)."""
    check_server_args(host, port)
    if host not in LOOPBACK and not quiet:
        print(f"warning: --host {host} exposes the UI (no login) to other machines", flush=True)
    ws: Workspace = app.magicme_workspace
    app.queue(default_concurrency_limit=1)
    return app.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=not block,
        allowed_paths=[str(ws.root)],
        max_file_size=ws.limits.max_bytes,
        ssr_mode=False,
        quiet=quiet,
        footer_links=[],
        show_error=True,
    )
