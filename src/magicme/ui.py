"""`magicme ui`'s page: the Gradio layout and its wiring to the handlers in `ui_handlers.py`.

Each browser gets its own workspace (a random key kept in its local storage names it; with --auth the
login names it; with --shared everyone shares one). Handlers return dicts of output names; `build_app`
maps them onto components, escapes every status line (a `<v*>` token shows whole) and keeps it until
the next action. The server and its boundaries are in `ui_server.py`.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import gradio as gr  # this module is the web UI; the CLI imports it only for `magicme ui`

from .ui_handlers import (
    ANIMATEDIFF_FIELDS,
    GENERATE_FIELDS,
    MODEL_FIELDS,
    NOT_SUBJECT_RGB,
    SUBJECT_RGB,
    Problem,
    backbone_defaults,
    config_defaults,
    guarded,
    is_tiny,
    on_evaluate,
    on_generate,
    on_import_identity,
    on_upload_loras,
    on_pick_mask,
    on_pick_set,
    on_pick_video,
    on_prepare,
    on_refine,
    on_save_mask,
    on_train,
    on_upload,
    page_backbone,
    problem,
    random_seed,
    reuse_settings,
    video_choices,
    video_gallery,
)
from .ui_server import launch  # noqa: F401  (the tests and `serve` start the app with it)
from .workspace import SHARED, Workspace, Workspaces

TINY_WARNING = ("⚠ **Base model `tiny`: random weights, so every video is coloured noise.** It runs the whole workflow "
                "offline in seconds; for real videos enter an SD-1.5-family or Wan 2.x model under *Model* (a hub id, a diffusers "
                "folder or a .safetensors file on the server).")
WAN_NOTE = ("On Wan: 81 frames at 16 fps, 50 steps and guidance 5 unless you change them; one prompt per clip "
            "(no prompt travel, FreeNoise windows or FreeInit: Wan denoises the whole clip at once); sides multiples of 16.")
FRAMES_LABEL = {False: "Frames (over 16: FreeNoise windows)", True: "Frames (Wan makes 1 + 4k and keeps these)"}
GAMMA_LABEL = {False: "γ: noise-prior frame correlation (paper: 0.15; 0 = stock AnimateDiff)",
               True: "γ: noise-prior frame correlation (paper: 0.15; 0 = stock WanPipeline)"}
STATUS_KEYS = ("model_status", "upload_status", "prepare_status", "mask_status", "train_status", "import_status", "gen_status",
               "video_status", "refine_status", "eval_status")
# an output that stands for several components: what each handler key updates
EXPANSION = {
    "ref_set": ("ref_set", "eval_set"),
    "trained": ("identities", "refine_identities"),
    "identity": ("identities", "refine_identities"),
    "new_video": ("video_pick", "library", "library_names", "lib_video", "lib_settings", "scores", "refine_prompt",
                  "refine_identities"),
    "tab": ("tabs",),
}


def rgb(color: tuple[int, int, int]) -> str:
    return f"rgb({color[0]}, {color[1]}, {color[2]})"


def status_html(text: str | None) -> str:
    """A status line as escaped HTML (a `<v*>` token shows whole); a `Problem` in red."""
    if not text:
        return ""
    css = "mm-error" if isinstance(text, Problem) else "mm-status"
    return f'<div class="{css}">{html.escape(text).replace(chr(10), "<br>")}</div>'


def build_app(workdir: str | Path = "magicme-ui", *, device: str | None = None, shared: bool = False,
              workspace: Workspace | None = None) -> gr.Blocks:
    """The Gradio app over one work folder (`gr.Blocks`, not launched).

    `workspace`: every page uses this one (tests); else `<workdir>/workspaces/` holds one per browser
    (per login with --auth, one for all with `shared`).
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage pings or version checks
    from .evaluate import MetricModels
    from .generate import GenerateConfig
    from .long_video import WEIGHTING_SCHEMES
    from .models import PRESETS, SCHEDULERS
    from .segment import SEGMENTERS
    from .train import TrainConfig

    spaces = None if workspace is not None else Workspaces(workdir, device=device)
    files_root = workspace.root if workspace is not None else spaces.root
    d = config_defaults(GenerateConfig)
    train_defaults = config_defaults(TrainConfig)
    c: dict[str, gr.components.Component] = {}  # every component the wiring names

    def open_ws(wid) -> Workspace:
        return workspace if workspace is not None else spaces.get(wid)

    def sets_update(ws, selected=None):
        names = ws.reference_sets()
        return gr.update(choices=names, value=selected if selected in names else (names[0] if names else None))

    def videos_out(ws: Workspace, picked: str | None) -> dict:
        items, names = video_gallery(ws)
        out = {"video_pick": gr.update(choices=video_choices(ws), value=picked if picked in names else None),
               "library": items, "library_names": names}
        if picked in names:
            out.update(on_pick_video(ws, picked))
            out["refine_identities"] = gr.update(choices=ws.identities(), value=out["refine_identities"])
        return out

    def adapt(out: dict, ws: Workspace, job_key: str | None) -> dict:
        """A handler's output dict → {component: value}."""
        res: dict = {}
        for key, value in out.items():
            if key in STATUS_KEYS:
                res[key] = status_html(value)
            elif key == "job":
                res[job_key] = value
            elif key == "ref_set":
                res.update(ref_set=sets_update(ws, value), eval_set=sets_update(ws, value))
            elif key in ("trained", "identity"):
                ids = ws.identities()
                res["identities"] = gr.update(choices=ids, value=[value]) if key == "trained" else gr.update(choices=ids)
                res["refine_identities"] = gr.update(choices=ids)
            elif key in ("identities", "refine_identities"):
                res[key] = gr.update(choices=ws.identities(), value=value)
            elif key == "new_video":
                res.update(videos_out(ws, value))
            elif key == "tab":
                res["tabs"] = gr.Tabs(selected=value)
            elif key == "paint":
                res["paint"] = gr.Accordion(open=value)
            else:
                res[key] = value
        return {c[k]: v for k, v in res.items()}

    def on(trigger, handler, inputs: list[str], keys: list[str], status: str, job: str | None = None, **kwargs):
        """Wire `handler(ws, *input values)` to `trigger`; its output keys (expanded) are the event's outputs."""
        outputs = [status, *(n for k in keys for n in EXPANSION.get(k, (k,))), *([job] if job else [])]
        outputs = list(dict.fromkeys(outputs))

        def run(wid, *values):
            try:
                ws = open_ws(wid)
            except ValueError as e:
                yield {c[status]: status_html(problem(e))}
                return
            for out in guarded(handler, status, ws)(ws, *values):
                yield adapt(out, ws, job)

        if job:  # model jobs wait in the workspace queue, which tells them their place; Gradio's own queue holds the rest
            kwargs = dict(concurrency_limit=8, concurrency_id="jobs", show_progress="minimal", **kwargs)
        return trigger(run, [c["sid"], *(c[n] for n in inputs)], [c[n] for n in outputs], **kwargs)

    def cancel(wid, job_id):
        """Cancel this page's job of one section by its id; its own handler then reports "Cancelled"."""
        try:
            asked = open_ws(wid).cancel(job_id) if job_id else 0
        except ValueError:
            asked = 0
        if asked:
            gr.Info("Cancelling: the job stops at its next step.")
        else:
            gr.Info("Nothing to cancel: no job of this page is running in this section.")

    with gr.Blocks(title="magicme", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        # delete_cache: the copies Gradio keeps of uploads and outputs go after a day, checked hourly
        c["sid"] = gr.State(None)  # this page's workspace id (server-side only)
        # the browser's workspace key: encryption in local storage is Gradio's, client-side (the key itself is the secret)
        c["browser_key"] = gr.BrowserState(None, storage_key="magicme-workspace", secret="magicme-ui")
        for name in ("job_prepare", "job_train", "job_generate", "job_refine", "job_eval", "library_names",
                     "gen_clip_names", "mask_index"):
            c[name] = gr.State(None)
        gr.Markdown("# magicme\nIdentity-specific video generation (Magic-Me / VCD): upload photos of a subject → "
                    "make its identity → generate videos with it.")
        c["where"] = gr.Markdown(elem_id="where")
        c["tiny_warning"] = gr.Markdown(TINY_WARNING, elem_id="tiny_warning", elem_classes=["mm-warning"])
        with gr.Accordion("Model", open=False):
            gr.Markdown("For real videos give an SD-1.5-family base model (hub id, folder or .safetensors on the server) "
                        "and, if not inside its folder, a motion adapter. Speed presets: *fast* is AnimateDiff-Lightning "
                        "(4 steps), *lcm* AnimateLCM, *reference* the Magic-Me code's own recipe (DPM++ 2M Karras, 20 steps, "
                        "CFG 8, FreeU); the scheduler applies to *full*. Backbone *wan*: a Wan 2.1/2.2 text-to-video model "
                        "(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers; with *tiny* the tiny Wan preset), which has none of the "
                        "AnimateDiff-only options; *auto* reads the base model's files.")
            with gr.Row():
                c["backbone"] = gr.Dropdown(["auto", "animatediff", "wan"], value="auto", label="Backbone", elem_id="backbone",
                                            scale=0, min_width=140)
                c["base"] = gr.Textbox("tiny", label="Base model", elem_id="base")
                c["motion_adapter"] = gr.Textbox("", label="Motion adapter", elem_id="motion_adapter",
                                                 placeholder="default: BASE/motion_adapter or guoyww/animatediff-motion-adapter-v1-5-2")
                c["base_config"] = gr.Textbox("", label="Base config (single-file base only)")
                c["scheduler"] = gr.Dropdown(list(SCHEDULERS), value="ddim", label="Scheduler (full preset)")
                c["preset"] = gr.Dropdown(list(PRESETS), value="full", label="Speed preset", elem_id="preset")
            with gr.Row():
                for key, label, what in (("loras", "LoRAs", "style/character LoRAs (kohya/A1111 or diffusers)"),
                                         ("motion_loras", "Motion LoRAs", "AnimateDiff motion LoRAs (v2_lora_ZoomIn.ckpt …)")):
                    with gr.Column():
                        c[key] = gr.Textbox(label=label, lines=2, elem_id=key, placeholder="NAME:SCALE, one per line",
                                            info=f"{what}: upload them below, or give a file on the server by its full path; "
                                                 "the number after the colon is the scale (default 1)")
                        c[f"{key}_files"] = gr.File(label=f"Upload {label.lower().replace('lora', 'LoRA')} (.safetensors, .ckpt)",
                                                    file_count="multiple", file_types=[".safetensors", ".ckpt", ".pt", ".pth"],
                                                    elem_id=f"{key}_files", height=150)
                with gr.Column():
                    c["freeu"] = gr.Textbox("", label="FreeU", elem_id="freeu", placeholder="blank: the preset's",
                                            info="on: SD-1.5's 1.5, 1.6, 0.9, 0.2; or b1, b2, s1, s2; blank: the preset's "
                                                 "(reference: 1.1, 1.2, 0.9, 0.4; the others: off)")
                    c["clip_skip"] = gr.Number(0, label="Clip skip", precision=0, minimum=0, elem_id="clip_skip",
                                               info="text-encoder layers left out at the end (1 = A1111's “Clip skip: 2”)")
            c["model_status"] = gr.Markdown(elem_id="model_status")

        with gr.Tabs() as c["tabs"]:
            with gr.Tab("1 · Photos & identity", id="identity"):
                with gr.Row():
                    with gr.Column():
                        c["photo_files"] = gr.File(label="Reference photos (JPEG/PNG/WebP, up to 20; 3–20 of the subject alone work best)",
                                                   file_count="multiple", file_types=["image"], elem_id="photos")
                        c["class_word"] = gr.Textbox(label="Class word", placeholder="dog, woman, teddy bear …", elem_id="class_word")
                        c["save_photos"] = gr.Button("Save photos", variant="primary", elem_id="save_photos")
                        c["upload_status"] = gr.Markdown(elem_id="upload_status")
                    with gr.Column():
                        c["ref_set"] = gr.Dropdown([], label="Reference sets", elem_id="ref_set")
                        c["photos"] = gr.Gallery(label="Photos", columns=4, height=260, buttons=["download"], elem_id="ref_images")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**Masks** (§4.2): only the subject is learned. It is found by its class word "
                                    "(Grounding DINO + SAM when available, else GrabCut), or upload your own masks "
                                    "(white = subject, named after their photo: `dog1.png` or `dog1_mask.png` for `dog1.jpg`).")
                        with gr.Row():
                            c["segmenter"] = gr.Dropdown(list(SEGMENTERS), value="auto", label="Segmenter")
                            c["mask_files"] = gr.File(label="Your own masks (optional)", file_count="multiple",
                                                      file_types=["image"], elem_id="mask_files")
                        with gr.Row():
                            c["prepare"] = gr.Button("Make masks", elem_id="prepare")
                            c["cancel_prepare"] = gr.Button("Cancel", variant="stop", elem_id="cancel_prepare")
                        c["prepare_status"] = gr.Markdown(elem_id="prepare_status")
                        c["masks"] = gr.Gallery(label="Masks (click one to paint it)", columns=4, height=200, allow_preview=False,
                                                buttons=["download"], elem_id="masks")
                    c["contact"] = gr.Image(label="Photos and masks", type="filepath", interactive=False, height=420,
                                            elem_id="contact_sheet")
                with gr.Accordion("Paint a mask (click a mask above to open it here)", open=False) as c["paint"]:
                    with gr.Row():
                        c["mask_editor"] = gr.ImageEditor(
                            label="Red: the subject · blue: not the subject", type="numpy", image_mode="RGBA", sources=(),
                            transforms=(), layers=False, brush=gr.Brush(colors=[rgb(SUBJECT_RGB), rgb(NOT_SUBJECT_RGB)],
                                                                        color_mode="fixed"),
                            eraser=gr.Eraser(), height=420, canvas_size=(512, 512), fixed_canvas=True, elem_id="mask_editor")
                        with gr.Column(scale=0, min_width=220):
                            c["save_mask"] = gr.Button("Save mask", elem_id="save_mask")
                            c["mask_status"] = gr.Markdown(elem_id="mask_status")
                with gr.Row():
                    with gr.Column():
                        gr.Markdown("**Train the identity** (§4.2, §5.2 defaults): extended ID tokens with the masked loss.")
                        with gr.Row():
                            c["token"] = gr.Textbox(train_defaults["token"], label="Token", elem_id="token")
                            c["train_steps"] = gr.Number(train_defaults["steps"], label="Steps", precision=0, elem_id="train_steps")
                            c["lr"] = gr.Number(train_defaults["lr"], label="Learning rate")
                        with gr.Row():
                            c["num_vectors"] = gr.Number(train_defaults["num_vectors"], label="Vectors", precision=0)
                            c["masked"] = gr.Checkbox(train_defaults["masked"], label="Masked loss")
                            c["train_seed"] = gr.Number(train_defaults["seed"], label="Seed", precision=0)
                            c["train_preview_every"] = gr.Number(train_defaults["checkpoint_every"], label="Preview every N steps (0: none)",
                                                                 precision=0, elem_id="train_preview_every")
                        with gr.Row():
                            c["form"] = gr.Dropdown(["tokens", "lora"], value="tokens", label="Identity form (Wan)", elem_id="form",
                                                    visible=False, info="tokens: ID tokens in the text encoder (§4.2); "
                                                                        "lora: a LoRA on the transformer's attention")
                            c["lora_rank"] = gr.Number(16, label="LoRA rank (Wan LoRA form)", precision=0, minimum=1,
                                                       elem_id="lora_rank", visible=False)
                        with gr.Row():
                            c["train"] = gr.Button("Train", variant="primary", elem_id="train")
                            c["cancel_train"] = gr.Button("Cancel", variant="stop", elem_id="cancel_train")
                    with gr.Column():
                        c["train_status"] = gr.Markdown(elem_id="train_status")
                        c["loss"] = gr.LinePlot(x="step", y="loss", title="Training loss", height=220, elem_id="loss_plot")
                        c["checkpoints"] = gr.Gallery(label="Checkpoint previews: 'a photo of a <token> <class>'", columns=3,
                                                      height=200, elem_id="checkpoints")
                with gr.Row():
                    c["id_file"] = gr.File(label="Import an identity (.safetensors)", file_types=[".safetensors"], elem_id="id_file")
                    with gr.Column():
                        c["import"] = gr.Button("Import identity", elem_id="import_identity")
                        c["import_status"] = gr.Markdown(elem_id="import_status")

            with gr.Tab("2 · Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        c["prompt"] = gr.Textbox(label="Prompt", lines=2, placeholder="a <v*> dog running on the beach", elem_id="prompt")
                        c["negative_prompt"] = gr.Textbox(d["negative_prompt"], label="Negative prompt", elem_id="negative_prompt")
                        c["identities"] = gr.Dropdown([], multiselect=True, label="Identities (the prompt must use their tokens)",
                                                      elem_id="identities")
                        c["gamma"] = gr.Slider(0.0, 0.99, value=d["gamma"], step=0.01, elem_id="gamma", label=GAMMA_LABEL[False])
                        with gr.Row():
                            c["frames"] = gr.Number(d["frames"], label=FRAMES_LABEL[False], precision=0, elem_id="frames")
                            c["width"] = gr.Textbox("", label="Width", placeholder="the model's (512; tiny 64)", elem_id="width")
                            c["height"] = gr.Textbox("", label="Height", placeholder="the model's (512; tiny 64)", elem_id="height")
                        with gr.Row():
                            c["seeds"] = gr.Textbox("0", label="Seeds (one clip each: 0, 1, 2 or 0-3)", elem_id="seeds")
                            c["dice"] = gr.Button("Random seed", elem_id="random_seed", scale=0, min_width=140)
                        with gr.Row():
                            c["steps"] = gr.Textbox("", label="Steps", placeholder="the preset's (25 full)", elem_id="steps")
                            c["guidance"] = gr.Textbox("", label="Guidance", placeholder="the preset's (7.5 full)", elem_id="guidance")
                            c["fps"] = gr.Number(d["fps"], label="FPS", precision=0, elem_id="fps")
                            c["preview_every"] = gr.Number(5, label="Live preview every N steps (0: off)", precision=0, elem_id="preview_every")
                        with gr.Accordion("Long video and prompt travel", open=False) as c["long_video"]:
                            c["prompt_travel"] = gr.Textbox(label="Prompt travel: one 'FRAME: prompt' per line", lines=3,
                                                            placeholder="0: a <v*> dog walks\n24: a <v*> dog runs", elem_id="travel")
                            with gr.Row():
                                c["context_length"] = gr.Textbox("", label="Window frames", placeholder="16")
                                c["context_stride"] = gr.Number(d["context_stride"], label="Window stride", precision=0)
                                c["window_weighting"] = gr.Dropdown(list(WEIGHTING_SCHEMES), value=d["window_weighting"], label="Window blend")
                                c["free_init"] = gr.Textbox("", label="FreeInit iterations", placeholder="off")
                        c["wan_note"] = gr.Markdown(WAN_NOTE, visible=False, elem_id="wan_note")
                        with gr.Row():
                            c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
                            c["cancel_generate"] = gr.Button("Cancel", variant="stop", elem_id="cancel_generate")
                    with gr.Column():
                        c["gen_status"] = gr.Markdown(elem_id="gen_status")
                        c["preview"] = gr.Image(label="Live preview (frames while denoising)", type="numpy", interactive=False,
                                                height=160, elem_id="preview")
                        c["gen_video"] = gr.Video(label="Video", interactive=False, buttons=["download"], loop=True, height=360, elem_id="gen_video")
                        c["gen_clips"] = gr.Gallery(label="Clips of this request (click to play)", columns=4, height=220, allow_preview=False,
                                                    object_fit="contain", elem_id="gen_clips")
                        c["gen_settings"] = gr.JSON(label="Settings (run record)", elem_id="gen_settings")

            with gr.Tab("3 · Videos", id="videos"):
                with gr.Row():
                    with gr.Column():
                        with gr.Row():
                            c["video_pick"] = gr.Dropdown([], label="Videos", elem_id="video_pick", scale=3)
                            c["refresh"] = gr.Button("Refresh", scale=0, min_width=90)
                            c["reuse"] = gr.Button("Reuse these settings", scale=0, min_width=170, elem_id="reuse")
                        c["video_status"] = gr.Markdown(elem_id="video_status")
                        c["library"] = gr.Gallery(label="All videos (click to open)", columns=4, height=360, allow_preview=False,
                                                  object_fit="contain", elem_id="library")
                    with gr.Column():
                        c["lib_video"] = gr.Video(label="Video", interactive=False, buttons=["download"], loop=True, height=360, elem_id="lib_video")
                        c["lib_settings"] = gr.JSON(label="Settings (run record)", elem_id="lib_settings")
                with gr.Accordion("Refine (paper §4.3): Face VCD and Tiled VCD upscaling of the picked video", open=True):
                    with gr.Row():
                        with gr.Column():
                            c["refine_prompt"] = gr.Textbox(label="Prompt (from the video)", lines=2, elem_id="refine_prompt")
                            c["refine_identities"] = gr.Dropdown([], multiselect=True, label="Identities", elem_id="refine_identities")
                            with gr.Row():
                                c["refine_strength"] = gr.Textbox("", label="Strength", placeholder="0.8 face, 0.2 upscale (§5.2)", elem_id="refine_strength")
                                c["refine_steps"] = gr.Number(25, label="Steps", precision=0, elem_id="refine_steps")
                                c["refine_seed"] = gr.Number(0, label="Seed", precision=0, elem_id="refine_seed")
                                c["refine_scale"] = gr.Dropdown([2, 4], value=2, label="Upscale ×", elem_id="refine_scale")
                            with gr.Row():
                                c["face"] = gr.Button("Face VCD", variant="primary", elem_id="face_vcd")
                                c["upscale"] = gr.Button("Upscale (Tiled VCD)", variant="primary", elem_id="upscale")
                                c["cancel_refine"] = gr.Button("Cancel", variant="stop", elem_id="cancel_refine")
                        with gr.Column():
                            c["refine_status"] = gr.Markdown(elem_id="refine_status")
                            c["refine_video"] = gr.Video(label="Refined video", interactive=False, buttons=["download"], loop=True, height=360,
                                                         elem_id="refine_video")
                            c["refine_settings"] = gr.JSON(label="Settings (run record)", elem_id="refine_settings")
                with gr.Accordion("Metrics (paper §5.2): CLIP-I, DINO, CLIP-T, temporal consistency of the picked video", open=True):
                    gr.Markdown("Scores the picked video (a refined one beside its source) against a reference set. "
                                "Metric models: hub ids, or folders saved with `save_pretrained` on the server.")
                    with gr.Row():
                        c["eval_set"] = gr.Dropdown([], label="Reference set", elem_id="eval_set")
                        c["clip_model"] = gr.Textbox(MetricModels().clip, label="CLIP model", elem_id="clip_model")
                        c["dino_model"] = gr.Textbox(MetricModels().dino, label="DINO model", elem_id="dino_model")
                    with gr.Row():
                        c["evaluate"] = gr.Button("Score", variant="primary", elem_id="evaluate")
                        c["cancel_eval"] = gr.Button("Cancel", variant="stop", elem_id="cancel_eval")
                    c["eval_status"] = gr.Markdown(elem_id="eval_status")
                    c["scores"] = gr.Markdown(elem_id="scores")
                    c["metrics"] = gr.JSON(label="Scores", elem_id="lib_metrics")

        # ---- the page opens its workspace
        def load(key, request: gr.Request):
            if workspace is not None:
                wid = workspace.id
            elif getattr(request, "username", None):
                wid = Workspaces.for_user(request.username)
            elif shared:
                wid = SHARED
            else:
                key, wid = Workspaces.for_browser(key)
            ws = open_ws(wid)
            sets = ws.reference_sets()
            ids = ws.identities()
            out = {"browser_key": key, "sid": wid, "where": f"Your work is kept in `{ws.root.relative_to(files_root.parent)}/` on the server.",
                   "ref_set": sets_update(ws), "eval_set": sets_update(ws),
                   "identities": gr.update(choices=ids), "refine_identities": gr.update(choices=ids),
                   **videos_out(ws, None), **on_pick_set(ws, sets[0] if sets else None)}
            out["prepare_status"] = status_html(out["prepare_status"])
            return {c[k]: v for k, v in out.items()}

        load_outputs = ["browser_key", "sid", "where", "ref_set", "eval_set", "identities", "refine_identities", "video_pick",
                        "library", "library_names", "photos", "class_word", "prepare_status", "contact", "masks",
                        "mask_editor", "mask_index"]
        app.load(load, [c["browser_key"]], [c[k] for k in load_outputs])
        c["base"].change(lambda base: gr.update(visible=is_tiny(base)), c["base"], c["tiny_warning"])

        # ---- the backbone: Wan hides the AnimateDiff-only fields and takes its own defaults where a field holds the other's
        layout_keys = [*ANIMATEDIFF_FIELDS, "long_video", "form", "lora_rank", "wan_note", "frames", "gamma", "fps", "lr", "steps",
                       "guidance", "width", "height", "tiny_warning"]

        def layout(backbone, base, frames, fps, lr, form):
            wan = page_backbone(backbone, base) == "wan"
            out = {k: gr.update(visible=not wan) for k in ANIMATEDIFF_FIELDS if k not in GENERATE_FIELDS}
            out.update(long_video=gr.update(visible=not wan), form=gr.update(visible=wan), lora_rank=gr.update(visible=wan),
                       wan_note=gr.update(visible=wan),
                       steps=gr.update(placeholder="Wan's 50" if wan else "the preset's (25 full)"),
                       guidance=gr.update(placeholder="Wan's 5" if wan else "the preset's (7.5 full)"))
            for side, wan_side in (("width", 832), ("height", 480)):
                out[side] = gr.update(placeholder=f"the model's ({wan_side}; tiny 64)" if wan else "the model's (512; tiny 64)")
            values = backbone_defaults("wan" if wan else "animatediff", frames, fps, lr, form if wan else "tokens")
            out.update({k: gr.update(value=v) for k, v in values.items()})
            out["frames"] = gr.update(label=FRAMES_LABEL[wan], **({"value": values["frames"]} if "frames" in values else {}))
            out["gamma"] = gr.update(label=GAMMA_LABEL[wan])
            out["tiny_warning"] = gr.update(visible=is_tiny(base))  # also here: leaving the field settles it
            out.update({k: gr.update() for k in layout_keys if k not in out})
            return {c[k]: v for k, v in out.items()}

        layout_inputs = [c[k] for k in ("backbone", "base", "frames", "fps", "lr", "form")]
        for trigger in (c["backbone"].change, c["base"].blur, c["form"].change):
            trigger(layout, layout_inputs, [c[k] for k in layout_keys])

        # ---- photos and masks
        on(c["save_photos"].click, on_upload, ["photo_files", "class_word"],
           ["ref_set", "photos", "upload_status", "prepare_status", "contact", "masks", "mask_editor", "mask_index"], "upload_status")
        on(c["ref_set"].input, on_pick_set, ["ref_set"],
           ["photos", "class_word", "prepare_status", "contact", "masks", "mask_editor", "mask_index"], "prepare_status")
        on(c["prepare"].click, on_prepare, ["ref_set", "segmenter", "mask_files"], ["prepare_status", "contact", "masks"],
           "prepare_status", job="job_prepare")

        def pick_mask(wid, name, evt: gr.SelectData):
            yield from run_once(wid, lambda ws: on_pick_mask(ws, name, evt.index), "mask_status")

        c["masks"].select(pick_mask, [c["sid"], c["ref_set"]], [c[k] for k in ("mask_editor", "mask_index", "mask_status", "paint")])
        on(c["save_mask"].click, on_save_mask, ["ref_set", "mask_index", "mask_editor"],
           ["prepare_status", "contact", "masks", "mask_status", "mask_editor", "mask_index", "paint"], "mask_status")

        # ---- model
        for key, motion in (("loras", False), ("motion_loras", True)):
            on(c[f"{key}_files"].upload, lambda ws, files, text, motion=motion, key=key: {**on_upload_loras(ws, files, text, motion), f"{key}_files": None},
               [f"{key}_files", key], [key, f"{key}_files", "model_status"], "model_status")

        # ---- identities
        m = len(MODEL_FIELDS)
        on(c["train"].click, lambda ws, *v: on_train(ws, v[:m], *v[m:]),
           [*MODEL_FIELDS, "ref_set", "token", "train_steps", "lr", "num_vectors", "masked", "train_seed", "train_preview_every",
            "form", "lora_rank"],
           ["train_status", "loss", "checkpoints", "trained"], "train_status", job="job_train")
        on(c["import"].click, on_import_identity, ["id_file"], ["import_status", "identity"], "import_status")

        # ---- generate
        on(c["generate"].click, lambda ws, *v: on_generate(ws, v[:m], **dict(zip(GENERATE_FIELDS, v[m:]))),
           [*MODEL_FIELDS, *GENERATE_FIELDS], ["gen_status", "preview", "gen_video", "gen_settings", "gen_clips",
                                               "gen_clip_names", "new_video"], "gen_status", job="job_generate")
        c["dice"].click(lambda: str(random_seed()), None, c["seeds"])

        def pick_clip(wid, names, evt: gr.SelectData):
            def show(ws):
                name = (names or [])[evt.index]
                return {"gen_video": str(ws.video_path(name)), "gen_settings": ws.video_settings(name)}
            yield from run_once(wid, show, "gen_status")

        c["gen_clips"].select(pick_clip, [c["sid"], c["gen_clip_names"]], [c[k] for k in ("gen_video", "gen_settings", "gen_status")])

        # ---- videos
        video_keys = ["new_video"]
        on(c["video_pick"].input, lambda ws, name: {"new_video": name}, ["video_pick"], video_keys, "video_status")
        on(c["refresh"].click, lambda ws, name: {"new_video": name}, ["video_pick"], video_keys, "video_status")

        def pick_library(wid, names, evt: gr.SelectData):
            yield from run_once(wid, lambda ws: {"new_video": (names or [])[evt.index]}, "video_status")

        c["library"].select(pick_library, [c["sid"], c["library_names"]],
                            [c[n] for n in ("video_status", *EXPANSION["new_video"])])
        reuse_keys = [*MODEL_FIELDS, *GENERATE_FIELDS[:-1], "refine_strength", "refine_steps", "refine_seed", "refine_scale",
                      "refine_prompt", "refine_identities", "tab"]

        def reuse(ws, name):
            return {**reuse_settings(ws, name), "tab": "generate",
                    "video_status": f"The Generate form now holds the settings of {name}."}

        on(c["reuse"].click, reuse, ["video_pick"], reuse_keys, "video_status")
        for stage in ("face", "upscale"):
            on(c[stage].click, lambda ws, *v, stage=stage: on_refine(ws, v[:m], stage, *v[m:]),
               [*MODEL_FIELDS, "video_pick", "refine_prompt", "refine_identities", "refine_strength", "refine_steps",
                "refine_seed", "refine_scale"], ["refine_status", "refine_video", "refine_settings", "new_video"],
               "refine_status", job="job_refine")
        on(c["evaluate"].click, on_evaluate, ["video_pick", "eval_set", "clip_model", "dino_model"],
           ["eval_status", "scores", "metrics"], "eval_status", job="job_eval")
        for section in ("prepare", "train", "generate", "refine", "eval"):
            c[f"cancel_{section}"].click(cancel, [c["sid"], c[f"job_{section}"]], None, concurrency_limit=None)

        def run_once(wid, fn, status):
            """A select handler (it needs Gradio's event data, so it is not wired by `on`)."""
            try:
                ws = open_ws(wid)
            except ValueError as e:
                yield {c[status]: status_html(problem(e))}
                return
            for out in guarded(fn, status, ws)(ws):
                yield adapt(out, ws, None)

    app.magicme_files = files_root  # what the server lets Gradio copy outputs from (ui_server.launch)
    app.magicme_limits = (workspace or spaces).limits
    app.magicme_workspaces = spaces
    app.magicme_workspace = workspace
    return app
