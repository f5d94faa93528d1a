"""The web UI's handlers, headless on the tiny preset (the browser test drives the same app end to end)."""

import numpy as np
import pytest
import torch
from PIL import Image

from magicme.generate import GenerateConfig, generate
from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec
from magicme.video import read_video
from magicme.workspace import Workspace

pytest.importorskip("gradio")
from magicme import ui, ui_handlers as h  # noqa: E402

TINY_MODEL = ("tiny", "", "", "ddim", "full")


def last(outputs) -> dict:
    """Every output of a handler run merged, the later winning: what the page shows at the end."""
    page: dict = {}
    for out in outputs:
        page.update(out)
    return page


def run(handler, status, ws, *args, **kwargs) -> list[dict]:
    return list(h.guarded(handler, status, ws)(ws, *args, **kwargs))


def photo(path, size=(96, 96), shift=0):
    im = Image.new("RGB", size, (40, 90, 40))
    im.paste((230, 200, 60), (28 + shift, 24, 70 + shift, 76))  # the subject: a bright square on grass
    im.save(path)
    return str(path)


def identity_file(path, token="<v*>", seed=0):
    emb = torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))
    return save_identity(path, emb, IdentityInfo(token=token, class_word="dog", num_vectors=2, base="tiny"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("uiwork"), device="cpu")


# ---- messages


def test_messages_use_the_forms_words_and_show_tokens_whole():
    assert h.ui_terms("--prompt 'a dog' does not contain the identity token '<v*>'") == "Prompt 'a dog' does not contain the identity token '<v*>'"
    assert h.ui_terms("--gamma: gamma must be in [0, 1)") == "γ: gamma must be in [0, 1)"
    assert h.ui_terms("--clip-model 'x' could not be loaded") == "CLIP model 'x' could not be loaded"
    assert h.ui_terms("--new-flag is bad; a-b --c") == "New flag is bad; a-b C"
    shown = ui.status_html(h.Problem("Error: Prompt 'a dog' lacks '<v*>'; write 'a <v*> dog' & more"))
    assert shown == ('<div class="mm-error">Error: Prompt &#x27;a dog&#x27; lacks &#x27;&lt;v*&gt;&#x27;; '
                     'write &#x27;a &lt;v*&gt; dog&#x27; &amp; more</div>')
    assert ui.status_html("Done: identity x (token <v*>)").startswith('<div class="mm-status">Done: identity x (token &lt;v*&gt;)')


def test_a_failure_is_one_line_in_the_status_without_server_folders(ws):
    def boom(ws):
        raise FileNotFoundError(f"--identity '{ws.root}/identities/x.safetensors' does not exist")
        yield

    out = list(h.guarded(boom, "gen_status", ws)(ws))
    assert out == [{"gen_status": "Error: Identity 'identities/x.safetensors' does not exist"}]
    assert isinstance(out[0]["gen_status"], h.Problem)

    def bug(ws):
        raise RuntimeError("a library broke\nover two lines")

    (out,) = h.guarded(bug, "eval_status", ws)(ws)
    assert out["eval_status"] == "Error: unexpected RuntimeError: a library broke over two lines (the server's console has the details)"


def test_progress_line_counts_steps_and_time_left(monkeypatch):
    clock = iter([100.0, 102.0, 104.0, 200.0])
    monkeypatch.setattr(h.time, "monotonic", lambda: next(clock))
    progress = h.Progress()
    assert progress.line("Denoising", 1, 5, key=1) == "Denoising: step 1/5"  # no pace yet
    assert progress.line("Denoising", 2, 5, key=1) == "Denoising: step 2/5 · 6 s left"  # 2 s a step, 3 to go
    assert progress.line("Denoising", 3, 5, key=1) == "Denoising: step 3/5 · 4 s left"
    assert progress.line("Denoising", 1, 5, key=2) == "Denoising: step 1/5"  # the next clip starts its own pace


@pytest.mark.parametrize("seeds, expected", [("3", [3]), ("0, 1, 2", [0, 1, 2]), ("4 5", [4, 5]), ("0-3", [0, 1, 2, 3]), (7, [7])])
def test_seeds(seeds, expected):
    assert h.parse_seeds(seeds) == expected


@pytest.mark.parametrize("seeds", ["", "abc", "1.5", "3-1", "-1", "0-99", ", ".join(map(str, range(17))), str(2**63)])
def test_bad_seeds_say_so(seeds):
    with pytest.raises(ValueError, match="Seeds"):
        h.parse_seeds(seeds)
    assert 0 <= h.random_seed() < 2**32


def test_model_boxes_say_only_not_a_usable_model_whatever_the_path_holds(tmp_path, tiny_model_dir):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    (tmp_path / "fake.safetensors").write_bytes(b"\x00" * 32)
    messages = set()
    for value in (str(tmp_path / "missing"), str(tmp_path / "notes"), str(tmp_path / "notes" / "a.txt"),
                  str(tmp_path / "fake.safetensors"), str(tmp_path / "missing.safetensors"), "/etc", "~/.ssh", "../..", "a b"):
        with pytest.raises(ValueError) as e:
            h.check_model_box("Base model", value)
        messages.add(str(e.value))
    assert len(messages) == 1 and messages.pop().startswith("Base model: not a usable model (")
    for value in ("", "tiny", "owner/model-on-the-hub", str(tiny_model_dir), str(tiny_model_dir / "motion_adapter")):
        h.check_model_box("Base model", value)


# ---- photos, masks, training


def test_upload_skips_an_unreadable_photo_by_name(ws, tmp_path):
    bad = tmp_path / "IMG_7.jpg"
    bad.write_text("not a photo")
    out = h.on_upload(ws, [photo(tmp_path / "a.png"), str(bad), photo(tmp_path / "b.png", shift=4)], " dog ")
    name = out["ref_set"]
    assert out["upload_status"] == (f"Stored 2 photo(s) of a dog as {name}. "
                                    "Skipped 1: IMG_7.jpg: not a readable image (UnidentifiedImageError).")
    assert [caption for _, caption in out["photos"]] == ["a.png", "b.png"]
    assert out["prepare_status"] == "No masks yet: make them (or upload your own), then train."
    assert h.on_pick_set(ws, name)["class_word"] == "dog"
    (failed,) = run(h.on_upload, "upload_status", ws, [str(bad)], "dog")
    assert failed["upload_status"].startswith("Error: photos: none of the 1 file(s) is a usable photo (IMG_7.jpg: not a readable image")


def test_masks_paint_train_with_previews_and_cancel(ws, tmp_path):
    name = h.on_upload(ws, [photo(tmp_path / f"s{i}.png", shift=4 * i) for i in range(3)], "dog")["ref_set"]
    failed = run(h.on_train, "train_status", ws, TINY_MODEL, name, "<tr>", 2, 1e-3, 2, True, 0)[-1]
    assert failed["train_status"] == f"Error: reference set {name!r} has no masks yet: make them first"
    page = last(h.on_prepare(ws, name, "grabcut"))
    assert page["prepare_status"].startswith("Masks of 3 photo(s) by grabcut") and len(page["masks"]) == 3
    mask = np.asarray(Image.open(page["masks"][0][0])) > 127
    assert 0.05 < mask.mean() < 0.9  # a subject, not the whole frame or nothing
    # paint: the editor opens the photo with the subject tinted red; red strokes add to the mask, blue ones remove
    opened = h.on_pick_mask(ws, name, 1)
    image, mask = ws.mask(name, 1)
    assert opened["mask_index"] == 1 and opened["paint"] and opened["mask_editor"]["layers"] == []
    assert np.array_equal(opened["mask_editor"]["background"], h.mask_overlay(image, mask))
    stroke = np.zeros((*mask.shape, 4), np.uint8)
    stroke[:100, :200] = (*h.SUBJECT_RGB, 255)
    erase = np.zeros_like(stroke)
    erase[mask.shape[0] // 2:] = (*h.NOT_SUBJECT_RGB, 200)
    (failed,) = run(h.on_save_mask, "mask_status", ws, name, 1, {"background": None, "layers": [], "composite": None})
    assert failed["mask_status"].startswith("Error: Masks: nothing painted yet")
    saved = h.on_save_mask(ws, name, 1, {"background": None, "layers": [stroke, erase], "composite": None})
    assert saved["mask_status"] == "Saved mask 2; training uses it." and "1 painted by you" in saved["prepare_status"]
    assert saved["masks"][1][1].startswith("2: user")
    expected = mask.copy()
    expected[:100, :200] = True
    expected[mask.shape[0] // 2:] = False
    assert np.array_equal(ws.mask(name, 1)[1], expected)
    # train: loss curve live, one checkpoint preview, the identity at the end
    outs = run(h.on_train, "train_status", ws, TINY_MODEL, name, "<tr>", 2, 1e-3, 2, True, 0, 2)
    page = last(outs)
    assert [o["train_status"][:19] for o in outs if "loss" in o and o.get("train_status", "").startswith("Training")] == [
        "Training: step 1/2 ", "Training: step 2/2 "]
    assert str(outs[0]["loss"]["loss"].dtype) == "float64"  # typed while empty, so the plot's axes are numeric
    assert list(page["loss"]["step"]) == [1, 2] and np.isfinite(page["loss"]["loss"]).all()
    (preview, caption), = page["checkpoints"]
    assert caption == "step 2" and Image.open(preview).size[1] > 0
    ident = page["trained"]
    assert page["train_status"] == f"Done: identity {ident} (token <tr>). Use it in Generate."
    assert dict((n, label) for label, n in ws.identities())[ident].startswith("<tr> (dog)")
    # cancelling by the job's id writes no identity
    before = ws.identities()
    gen = h.on_train(ws, TINY_MODEL, name, "<tc>", 50, 1e-3, 2, True, 0)
    first = next(gen)
    for out in gen:
        if out.get("train_status", "").startswith("Training: step 1/"):
            assert ws.cancel(first["job"]) == 1
    assert out["train_status"] == "Cancelled; no identity was written." and ws.identities() == before


# ---- generate


def test_generate_matches_cli_generate_per_seed_with_previews_and_named_clips(ws, tmp_path):
    outs = list(h.on_generate(ws, TINY_MODEL, "a dog running", "", [], 0.3, 3, None, None, 4, "7, 8", 7.5, 8, preview_every=2))
    page = last(outs)
    names = page["gen_clip_names"]
    assert page["gen_status"] == f"Done: 2 clip(s): {names[0]}, {names[1]}"
    assert [n[:19] for n in names] == ["a-dog-running-s7-20", "a-dog-running-s8-20"]
    assert [o["gen_status"].split(" ·")[0] for o in outs if o.get("gen_status", "").startswith("Denoising")] == [
        f"Denoising clip {c}/2: step {s}/4" for c in (1, 2) for s in (1, 2, 3, 4)]
    previews = [o["preview"] for o in outs if o.get("preview") is not None]
    assert len(previews) == 2 and previews[0].shape == (64, 3 * 64, 3)  # steps 2 of each clip; 4 is the clip itself
    assert [caption for _, caption in page["gen_clips"]][0].startswith("a dog running · seed 7 · ")
    assert ws.videos()[:2] == names[::-1] and page["new_video"] == names[1]
    settings = ws.video_settings(names[0])
    assert (settings["gamma"], settings["seed"], settings["frames"], settings["steps"], settings["prompt"]) == (0.3, 7, 3, 4, "a dog running")
    # the UI's clip is the library's: same frames as `generate` with the same settings
    cfg = GenerateConfig(prompts=["a dog running"], seeds=[7], frames=3, steps=4, gamma=0.3, models=ModelSpec())
    ref = generate(cfg, tmp_path / "ref.mp4", pipe=ws.runner.pipeline(ModelSpec()), quiet=True)[0]
    assert np.array_equal(read_video(ws.video_path(names[0])), read_video(ref))


def test_width_and_height_and_reuse_these_settings_remake_the_clip(ws, tiny_model_dir):
    model = (str(tiny_model_dir), "", "", "euler", "full")
    page = last(h.on_generate(ws, model, "a dog", "ugly", [], 0.2, 2, 48, 32, 2, "11", "", 8, prompt_travel="1: a cat"))
    name = page["new_video"]
    assert read_video(ws.video_path(name)).shape == (2, 32, 48, 3)
    form = h.reuse_settings(ws, name)
    assert {k: form[k] for k in ("base", "scheduler", "prompt", "negative_prompt", "gamma", "width", "height", "seeds",
                                 "prompt_travel", "motion_adapter")} == {
        "base": str(tiny_model_dir.resolve()), "scheduler": "euler", "prompt": "a dog", "negative_prompt": "ugly",
        "gamma": 0.2, "width": "48", "height": "32", "seeds": "11", "prompt_travel": "1: a cat", "motion_adapter": ""}
    again = last(h.on_generate(ws, tuple(form[k] for k in h.MODEL_FIELDS),
                               **{k: form[k] for k in h.GENERATE_FIELDS if k in form}))
    assert again["new_video"] != name
    assert np.array_equal(read_video(ws.video_path(again["new_video"])), read_video(ws.video_path(name)))


def test_generate_with_an_identity_checks_the_token_and_says_so_whole(ws, tmp_path):
    name = ws.import_identity(str(identity_file(tmp_path / "id.safetensors", token="<sks>", seed=3)))
    outs = run(h.on_generate, "gen_status", ws, TINY_MODEL, "a dog", "", [name], 0.15, 2, None, None, 1)
    assert outs[-1]["gen_status"] == "Error: Prompt 'a dog' does not contain the identity token '<sks>'; write it e.g. as 'a <sks> dog'"
    assert "Loading" not in outs[-1]["gen_status"]
    page = last(h.on_generate(ws, TINY_MODEL, "a <sks> dog", "", [name], 0.15, 2, None, None, 1))
    assert page["gen_settings"]["models"]["identities"][0]["token"] == "<sks>"
    out = run(h.on_generate, "gen_status", ws, TINY_MODEL, "a <sks> dog", "", ["../id.safetensors"], 0.15, 2)[-1]
    assert out["gen_status"] == "Error: identity '../id.safetensors' is not a name from this workspace"


@pytest.fixture(scope="module")
def lora_uploads(tmp_path_factory):
    """A kohya LoRA and an AnimateDiff motion LoRA (pickled .ckpt) for the tiny preset, as a user uploads them."""
    from lora_files import animatediff_motion_lora_layout, kohya_layout, random_lora, random_motion_lora
    from safetensors.torch import save_file

    from magicme.models import load_pipeline

    pipe = load_pipeline(ModelSpec(), device="cpu")
    root = tmp_path_factory.mktemp("lora-uploads")
    save_file(kohya_layout(random_lora(pipe.unet, pipe.text_encoder)), str(root / "My Style (v2).safetensors"))
    torch.save(animatediff_motion_lora_layout(random_motion_lora(pipe.unet)), root / "v2_lora_ZoomIn.ckpt")
    return root


def test_model_section_loras_freeu_clip_skip_make_the_clip_the_cli_makes_and_reuse_refills_them(ws, lora_uploads, tmp_path):
    from magicme.models import load_pipeline

    style, zoom = str(lora_uploads / "My Style (v2).safetensors"), str(lora_uploads / "v2_lora_ZoomIn.ckpt")
    page = h.on_upload_loras(ws, [style, zoom], "", motion=False)  # the motion LoRA in the wrong box is skipped by name
    (name,) = ws.loras()
    assert name.startswith("my-style-v2-") and page["loras"] == f"{name}:1.0"
    assert "Skipped LoRA 'v2_lora_ZoomIn.ckpt' is an AnimateDiff motion LoRA; upload it under Motion LoRAs" in page["model_status"]
    mname = h.on_upload_loras(ws, [zoom], "", motion=True)["motion_loras"].split(":")[0]
    assert mname.endswith(".safetensors") and (ws.root / "loras" / mname).read_bytes()[:8] != b"PK\x03\x04"  # no pickle kept

    model = ("tiny", "", "", "dpmpp-2m", "full", f"{name}:0.5", f"{mname}:0.6", "1.1, 1.2, 0.9, 0.4", 1)
    page = last(h.on_generate(ws, model, "a dog", "", [], 0.15, 2, None, None, 2, "5"))
    record = page["gen_settings"]["models"]
    assert [e["scale"] for e in record["loras"] + record["motion_loras"]] == [0.5, 0.6]
    assert record["freeu"] == {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.4} and record["clip_skip"] == 1
    # the reference: CLI-style generate with the files as uploaded (the UI re-saved them as .safetensors)
    spec = ModelSpec(scheduler="dpmpp-2m", loras=(f"{style}:0.5",), motion_loras=(f"{zoom}:0.6",), freeu=(1.1, 1.2, 0.9, 0.4), clip_skip=1)
    cfg = GenerateConfig(prompts=["a dog"], seeds=[5], frames=2, steps=2, gamma=0.15, models=spec)
    ref = generate(cfg, tmp_path / "ref.mp4", pipe=load_pipeline(spec, device="cpu"), quiet=True)[0]
    assert np.array_equal(read_video(ws.video_path(page["new_video"])), read_video(ref))
    plain = last(h.on_generate(ws, TINY_MODEL, "a dog", "", [], 0.15, 2, None, None, 2, "5"))["new_video"]
    assert not np.array_equal(read_video(ws.video_path(plain)), read_video(ref))  # the options did something

    form = h.reuse_settings(ws, page["new_video"])
    assert {k: form[k] for k in ("scheduler", "loras", "motion_loras", "freeu", "clip_skip")} == {
        "scheduler": "dpmpp-2m", "loras": f"{name}:0.5", "motion_loras": f"{mname}:0.6", "freeu": "1.1, 1.2, 0.9, 0.4", "clip_skip": 1}
    again = last(h.on_generate(ws, tuple(form[k] for k in h.MODEL_FIELDS), **{k: form[k] for k in h.GENERATE_FIELDS if k in form}))
    assert np.array_equal(read_video(ws.video_path(again["new_video"])), read_video(ref))


def test_training_takes_the_loras_and_says_it_leaves_out_the_sampling_options(ws, lora_uploads, tmp_path):
    name = h.on_upload(ws, [photo(tmp_path / f"t{i}.png", shift=4 * i) for i in range(2)], "dog")["ref_set"]
    last(h.on_prepare(ws, name, "grabcut"))
    lora = h.on_upload_loras(ws, [str(lora_uploads / "My Style (v2).safetensors")], "")["loras"]
    outs = list(h.on_train(ws, ("tiny", "", "", "ddim", "full", lora, "", "on", 1), name, "<lt>", 1, 1e-3, 1, True, 0))
    assert outs[0]["train_status"] == "Starting… (training leaves out FreeU, clip skip: they apply when generating)"
    from magicme.video import read_sidecar

    models = read_sidecar(ws.identity_path(last(outs)["trained"]))["models"]
    assert [e["scale"] for e in models["loras"]] == [1.0] and "freeu" not in models and "clip_skip" not in models


def test_reference_preset_records_its_recipe_and_reuse_leaves_its_freeu_blank(ws):
    page = last(h.on_generate(ws, ("tiny", "", "", "ddim", "reference"), "a dog", "", [], 0.15, 2, None, None, 1, "0"))
    models = page["gen_settings"]["models"]
    assert (models["preset"], models["scheduler"], models["freeu"]) == ("reference", "dpmpp-2m-karras", {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.4})
    form = h.reuse_settings(ws, page["new_video"])
    assert (form["preset"], form["freeu"], form["loras"], form["clip_skip"]) == ("reference", "", "", 0)


def test_lora_boxes_name_no_server_path_they_cannot_use(ws, tmp_path):
    """A missing path, a file that is no LoRA and a relative path all get the same words (no existence oracle)."""
    not_lora = tmp_path / "notes.safetensors"
    not_lora.write_bytes(b"secret")
    messages = set()
    for entry in ("/no/such/lora.safetensors", str(not_lora), "notes.safetensors", str(tmp_path)):
        out = run(h.on_generate, "gen_status", ws, (*TINY_MODEL, entry + ":0.8"), "a dog", "", [], 0.15, 2, None, None, 1)[-1]
        messages.add(out["gen_status"].replace(repr(entry), "X"))
    assert messages == {f"Error: LoRAs: X is not a usable LoRA ({h.LORA_HINT}, by its full path)"}
    bad = run(h.on_generate, "gen_status", ws, (*TINY_MODEL, "", "", "1, 2"), "a dog", "", [], 0.15, 2, None, None, 1)[-1]
    assert bad["gen_status"].startswith("Error: FreeU takes four numbers") and "--" not in bad["gen_status"]
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not weights")
    out = list(h.guarded(h.on_upload_loras, "model_status", ws)(ws, [str(junk)], "x:1.0"))[-1]
    assert out["model_status"].startswith("Error: LoRA 'junk.safetensors' is not a readable .safetensors file") and str(tmp_path) not in out["model_status"]


@pytest.mark.parametrize(
    "model, fields, message",
    [
        (TINY_MODEL, dict(gamma=1.0), "Error: γ: gamma must be in [0, 1)"),
        (TINY_MODEL, dict(frames=0), "Error: Frames must be an integer >= 1, got 0"),
        (TINY_MODEL, dict(width=50), "Error: Width must be a positive multiple of 8, got 50"),
        (TINY_MODEL, dict(seeds="1.5"), "Error: Seeds: '1.5' is not a seed"),
        (TINY_MODEL, dict(prompt="  "), "Error: Prompt is required (or a frame-0 Prompt travel)"),
        (("/no/such/model", "", "", "ddim", "full"), {}, "Error: Base model: not a usable model ("),
        (("tiny", "", "", "plms", "full"), {}, "Error: Scheduler must be one of"),
        (TINY_MODEL, dict(prompt_travel="x: a cat"), "Error: Prompt travel 'x: a cat' must be FRAME:PROMPT"),
        (TINY_MODEL, dict(prompt_travel="9: a cat"), "Error: Prompt travel frame 9 is outside the clip"),
    ],
)
def test_generate_bad_input_is_one_problem_line_before_any_work(ws, model, fields, message):
    args = dict(prompt="a dog", negative_prompt="", identities=[], gamma=0.15, frames=2, steps=1, seeds="0", fps=8) | fields
    before = ws.videos()
    outs = run(h.on_generate, "gen_status", ws, model, **args)
    assert outs[-1]["gen_status"].startswith(message) and "--" not in outs[-1]["gen_status"]
    assert ws.videos() == before


def test_cancel_keeps_finished_clips_and_writes_no_half_clip(ws):
    before = ws.videos()
    gen = h.on_generate(ws, TINY_MODEL, "a dog", "", [], 0.15, 2, None, None, 6, "1, 2")
    job = next(gen)["job"]
    for out in gen:
        if out.get("gen_status", "").startswith("Denoising clip 2/2: step 2/"):
            assert ws.cancel(job) == 1
    assert out["gen_status"] == "Cancelled; the 1 clip(s) finished before are kept."
    assert len(ws.videos()) == len(before) + 1
    assert sorted(p.name for p in (ws.root / "videos").iterdir() if p.name.startswith(".")) == []


# ---- videos: gallery, refine, score


def test_gallery_thumbnails_and_readable_captions(ws):
    items, names = h.video_gallery(ws)
    assert names == ws.videos() and len(items) == len(names)
    thumb, caption = items[0]
    frames = read_video(ws.video_path(names[0]))
    assert np.array_equal(np.asarray(Image.open(thumb).convert("RGB")), frames[len(frames) // 2])
    settings = ws.video_settings(names[0])
    assert caption == h.clip_caption(settings) and f"seed {settings['seed']}" in caption
    assert [label for label, _ in h.video_choices(ws)] == [c for _, c in items]


def test_refine_then_score_the_refined_clip_beside_its_source(ws, tmp_path):
    from magicme.evaluate import save_tiny_metric_models

    idname = ws.import_identity(str(identity_file(tmp_path / "r.safetensors", token="<rf>", seed=7)))
    source = last(h.on_generate(ws, TINY_MODEL, "a <rf> dog", "", [idname], 0.15, 3, None, None, 1))["new_video"]
    picked = h.on_pick_video(ws, source)
    assert (picked["refine_prompt"], picked["refine_identities"], picked["scores"]) == ("a <rf> dog", [idname], "Not scored yet.")
    outs = list(h.on_refine(ws, TINY_MODEL, "upscale", source, "a <rf> dog", [idname], "", 5, 1, 2))
    page = last(outs)
    refined = page["new_video"]
    assert page["refine_status"] == f"Done: {refined}. It is now the picked clip: score it below."
    assert any(o.get("refine_status") == "Tiled VCD: denoising step 1" for o in outs)
    assert read_video(ws.video_path(refined)).shape == (3, 128, 128, 3)
    assert (page["refine_settings"]["strength"], page["refine_settings"]["scale"]) == (0.2, 2)  # §5.2's 20 % by default
    assert ws.video_source(refined) == source
    form = h.reuse_settings(ws, refined)
    assert (form["refine_strength"], form["refine_steps"], form["refine_scale"], form["prompt"]) == ("0.2", 5, 2, "a <rf> dog")
    # score both: the refined clip's table shows its source's row too
    metric = save_tiny_metric_models(tmp_path / "metric")
    ref_set = h.on_upload(ws, [photo(tmp_path / "e.png")], "dog")["ref_set"]
    (failed,) = run(h.on_evaluate, "eval_status", ws, refined, None, metric.clip, metric.dino)
    assert failed["eval_status"] == "Error: Reference set: pick the photos to compare the clip with"
    (failed,) = run(h.on_evaluate, "eval_status", ws, refined, ref_set, str(tmp_path), metric.dino)
    assert failed["eval_status"].startswith("Error: CLIP model: not a usable model")
    last(h.on_evaluate(ws, source, ref_set, metric.clip, metric.dino))
    page = last(h.on_evaluate(ws, refined, ref_set, metric.clip, metric.dino))
    scores = page["metrics"]
    assert scores["scored_prompt"] == "a dog"  # the token replaced by the set's class word (§5.2)
    table = page["scores"].splitlines()
    assert table[0].startswith("| clip | DINO | CLIP-I") and table[2].startswith(f"| this clip | {scores['dino']:.4f} |")
    assert table[3].startswith(f"| its source | {ws.metrics(source)['dino']:.4f} |")


def test_face_vcd_without_a_face_says_the_clip_is_unchanged(ws):
    source = last(h.on_generate(ws, TINY_MODEL, "a dog", "", [], 0.15, 2, None, None, 1))["new_video"]
    page = last(h.on_refine(ws, TINY_MODEL, "face", source, "a dog", [], "", 2, 0))
    assert "no face found" in page["refine_status"] and page["refine_settings"]["strength"] == 0.8


# ---- the app


def test_app_builds_with_the_workflow(ws):
    import gradio as gr

    app = ui.build_app(workspace=ws)
    assert isinstance(app, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"photos", "class_word", "save_photos", "mask_files", "mask_editor", "save_mask", "train_preview_every",
            "checkpoints", "prompt", "identities", "gamma", "frames", "width", "height", "seeds", "random_seed",
            "preview", "generate", "cancel_generate", "gen_video", "gen_clips", "gen_settings", "library", "reuse",
            "lib_settings", "tiny_warning"} <= ids
    warning = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "tiny_warning")
    assert warning.visible and "coloured noise" in warning.value  # not in a collapsed section
    assert h.is_tiny("tiny") and h.is_tiny(" ") and not h.is_tiny("owner/model")
    assert app.magicme_workspace is ws and app.magicme_files == ws.root


# ---- the Wan backbone

WAN_MODEL = ("tiny", "", "", "ddim", "full", "", "", "", 0, "wan")


def cli_clip(tmp_path, name, *args) -> np.ndarray:
    from magicme.cli import main

    out = tmp_path / name
    assert main([*args, "--backbone", "wan", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    return read_video(out)


def test_wan_train_tokens_and_lora_generate_and_refine_as_the_cli_does(ws, tmp_path):
    name = h.on_upload(ws, [photo(tmp_path / f"w{i}.png", shift=4 * i) for i in range(3)], "dog")["ref_set"]
    last(h.on_prepare(ws, name, "grabcut"))
    pipe = ws.runner.pipeline(h.model_spec(*WAN_MODEL))
    words = len(pipe.tokenizer)
    idents = {}
    for form, lr in (("tokens", 1e-3), ("lora", 1e-4)):
        page = last(run(h.on_train, "train_status", ws, WAN_MODEL, name, "<w*>", 1, lr, 2, True, 0, 1, form, 2))
        idents[form] = page["trained"]
        assert [caption for _, caption in page["checkpoints"]] == ["step 1"]  # Wan's validation frames as the preview
        what = "Wan LoRA, trigger word <w*>" if form == "lora" else "token <w*>"
        assert page["train_status"] == f"Done: identity {idents[form]} ({what}). Use it in Generate."
        label = dict((n, label) for label, n in ws.identities())[idents[form]]
        assert label.startswith(f"<w*> (dog · Wan {'LoRA' if form == 'lora' else 'tokens'})")
    # tokens: the UI's clip is `magicme generate --backbone wan`'s, with live previews of the latent frames
    path = str(ws.identity_path(idents["tokens"]))
    outs = list(h.on_generate(ws, WAN_MODEL, "a <w*> dog", "", [idents["tokens"]], 0.15, 5, 32, 32, 2, "3", preview_every=1))
    page = last(outs)
    clip = page["new_video"]
    previews = [o["preview"] for o in outs if o.get("preview") is not None]
    assert len(previews) == 1 and previews[0].shape == (32, 2 * 32, 3)  # step 1 of 2; 5 frames are 2 latent frames
    record = ws.video_settings(clip)
    assert (record["backbone"], record["fps"], record["guidance"], record["frames"]) == ("wan", 16, 5.0, 5)
    ref = cli_clip(tmp_path, "tokens.mp4", "generate", "--base", "tiny", "--identity", path, "--prompt", "a <w*> dog",
                   "--frames", "5", "--width", "32", "--height", "32", "--steps", "2", "--seed", "3")
    assert np.array_equal(read_video(ws.video_path(clip)), ref)
    assert len(pipe.tokenizer) == words  # the job's words are gone from the shared pipeline
    # LoRA, blank frames/FPS: Wan's 81 at 16 fps, as the CLI's defaults
    lora_path = str(ws.identity_path(idents["lora"]))
    page = last(h.on_generate(ws, WAN_MODEL, "a <w*> dog", "", [idents["lora"]], 0.15, None, 16, 16, 1, "1", fps=None))
    record = ws.video_settings(page["new_video"])
    assert (record["frames"], record["fps"], record["models"]["identities"][0]["form"]) == (81, 16, "lora")
    ref = cli_clip(tmp_path, "lora.mp4", "generate", "--base", "tiny", "--identity", lora_path, "--prompt", "a <w*> dog",
                   "--width", "16", "--height", "16", "--steps", "1", "--seed", "1")
    assert np.array_equal(read_video(ws.video_path(page["new_video"])), ref)
    lora_layers = [m for m in pipe.transformer.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
    assert lora_layers and all(m.disable_adapters for m in lora_layers)  # off for the next job of the shared pipeline
    # reuse keeps the backbone and remakes the clip
    form = h.reuse_settings(ws, clip)
    assert (form["backbone"], form["base"], form["frames"], form["fps"], form["motion_adapter"]) == ("wan", "tiny", 5, 16, "")
    again = last(h.on_generate(ws, tuple(form[k] for k in h.MODEL_FIELDS), **{k: form[k] for k in h.GENERATE_FIELDS if k in form}))
    assert np.array_equal(read_video(ws.video_path(again["new_video"])), read_video(ws.video_path(clip)))
    # Tiled VCD on Wan: the CLI's clip (no ControlNet on Wan)
    page = last(h.on_refine(ws, WAN_MODEL, "upscale", clip, "a <w*> dog", [idents["tokens"]], "", 5, 0, 2))
    refined = page["new_video"]
    assert page["refine_settings"]["models"]["backbone"] == "wan"
    ref = cli_clip(tmp_path, "up.mp4", "upscale", "--base", "tiny", "--video", str(ws.video_path(clip)), "--identity", path,
                   "--prompt", "a <w*> dog", "--steps", "5", "--seed", "0")
    assert np.array_equal(read_video(ws.video_path(refined)), ref)
    page = last(h.on_refine(ws, WAN_MODEL, "face", clip, "a <w*> dog", [idents["lora"]], "", 5, 0))
    assert "no face found" in page["refine_status"]
    # a Wan identity on an AnimateDiff model, and AnimateDiff-only choices on Wan: one message each, before any work
    outs = run(h.on_generate, "gen_status", ws, TINY_MODEL, "a <w*> dog", "", [idents["tokens"]], 0.15, 2)
    assert outs[-1]["gen_status"] == (f"Error: Identity 'identities/{idents['tokens']}' is a Wan 2.x identity (tokens); this model "
                                      "is AnimateDiff (SD-1.5): use a Wan 2.x base model or retrain for this one")
    assert not any("Loading" in o.get("gen_status", "") for o in outs)
    (failed,) = run(h.on_train, "train_status", ws, TINY_MODEL, name, "<x*>", 1, 1e-3, 1, True, 0, 0, "lora")
    assert failed["train_status"] == "Error: Identity form lora: a LoRA identity is for the Wan backbone; an AnimateDiff identity is ID tokens"
    fast = ("tiny", "", "", "ddim", "fast", "", "", "", 0, "wan")
    (failed,) = run(h.on_generate, "gen_status", ws, fast, "a dog", "", [], 0.15, 5)[-1:]
    assert failed["gen_status"] == "Error: Speed preset fast is an AnimateDiff draft preset; with Wan leave it at full"


def test_backbone_defaults_follow_the_backbone_unless_typed(tmp_path):
    assert h.backbone_defaults("wan", 16, 8, 1e-3, "tokens") == {"frames": 81, "fps": 16}
    assert h.backbone_defaults("wan", 24, 8, 1e-3, "lora") == {"fps": 16, "lr": 1e-4}
    assert h.backbone_defaults("animatediff", 81, 16, 1e-4) == {"frames": 16, "fps": 8, "lr": 1e-3}
    assert h.backbone_defaults("animatediff", 20, 12, 5e-4) == {}
    assert h.page_backbone("wan", "tiny") == "wan" and h.page_backbone("auto", "tiny") == "animatediff"
    (tmp_path / "model_index.json").write_text('{"_class_name": "WanPipeline"}')
    assert h.page_backbone("auto", str(tmp_path)) == "wan" and h.page_backbone("animatediff", str(tmp_path)) == "animatediff"


@pytest.mark.parametrize("model, fields, message", [
    (("tiny", "", "", "euler"), {}, "Scheduler euler is an AnimateDiff scheduler; Wan uses its model's flow-matching scheduler"),
    (("tiny", "", "", "ddim", "full", "", "", "on"), {}, "FreeU is for SD-1.5-family models (AnimateDiff); a Wan identity in LoRA form is given with Identity"),
    (("tiny", "", "", "ddim", "full", "", "", "", 1), {}, "Clip skip is for SD-1.5-family models (AnimateDiff); a Wan identity in LoRA form is given with Identity"),
    ((), {"prompt_travel": "4: a cat"}, "Prompt travel runs in AnimateDiff's FreeNoise windows; Wan takes one prompt per clip"),
    ((), {"context_length": "8"}, "Window frames sets AnimateDiff's FreeNoise windows; Wan denoises the whole clip at once"),
    ((), {"width": "40"}, "Width must be a multiple of 16 for Wan (VAE 8× × patch 2), got 40"),
])
def test_animatediff_only_fields_on_wan_are_one_message_before_any_work(ws, model, fields, message):
    model = (*model, *WAN_MODEL[len(model):])
    before = ws.videos()
    outs = run(h.on_generate, "gen_status", ws, model, "a dog", "", [], 0.15, 5, **fields)
    assert [o["gen_status"] for o in outs] == ["Starting…", f"Error: {message}"] and ws.videos() == before


def test_a_wan_lora_identity_imports_past_the_token_size_limit(tmp_path):
    from magicme.wan_identity import save_wan_lora
    from magicme.workspace import UploadLimits

    ws = Workspace(tmp_path / "w", limits=UploadLimits(max_identity_bytes=256))
    lora = {"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 24), "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(24, 2)}
    path = save_wan_lora(tmp_path / "l.safetensors", lora, IdentityInfo("sks", "dog", 1, backbone="wan", form="lora", rank=2))
    name = ws.import_identity(str(path))
    assert dict((n, label) for label, n in ws.identities())[name].startswith("sks (dog · Wan LoRA)")
    tokens = save_identity(tmp_path / "t.safetensors", torch.zeros(4, 32), IdentityInfo("<t*>", "dog", 4, backbone="wan"))
    with pytest.raises(ValueError, match="too large for an identity file"):
        ws.import_identity(str(tokens))
