"""The web UI's handlers, headless on the tiny preset (the browser test drives the same app end to end)."""

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from magicme.generate import GenerateConfig, generate
from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec
from magicme.video import read_video
from magicme.workspace import Cancelled, UploadLimits, Workspace, check_images, stream

pytest.importorskip("gradio")
from magicme import ui  # noqa: E402

TINY_MODEL = ("tiny", "", "", "ddim", "full")


def photo(path, fmt="PNG", size=(40, 30), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path, format=fmt)
    return str(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return Workspace(tmp_path_factory.mktemp("uiwork"), device="cpu")


def identity_file(path, token="<v*>", seed=0, class_word="dog"):
    emb = torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))
    return save_identity(path, emb, IdentityInfo(token=token, class_word=class_word, num_vectors=2, base="tiny"))


# ---- uploads


def test_upload_stores_reencoded_png_under_generated_names(ws, tmp_path):
    src = [photo(tmp_path / "evil name.jpg", "JPEG"), photo(tmp_path / "b.webp", "WEBP", size=(16, 24))]
    name, images, status = ui.on_upload(ws, src, " dog ")
    assert name in ws.reference_sets() and "2 photo(s) of a dog" in status
    folder = ws.root / "references" / name / "images"
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png"]
    assert [Image.open(p).format for p in images] == ["PNG", "PNG"]
    assert Image.open(images[1]).size == (16, 24)
    assert ui.on_pick_set(ws, name) == (images, "dog")


def test_upload_type_is_checked_by_content_not_name(tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"#!/bin/sh\necho not an image\n")
    with pytest.raises(ValueError, match="photo 1: not a readable image"):
        check_images([str(fake)])
    gif_named_png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(gif_named_png, format="GIF")
    with pytest.raises(ValueError, match="photo 1: GIF content"):
        check_images([str(gif_named_png)])
    truncated = tmp_path / "t.png"
    photo(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="photo 1"):
        check_images([str(truncated)])


@pytest.mark.parametrize(
    "limits, count, size, needle",
    [
        (UploadLimits(max_files=2), 3, (8, 8), "3 files uploaded, at most 2"),
        (UploadLimits(max_bytes=100), 1, (64, 64), "over the"),
        (UploadLimits(max_pixels=1000), 1, (40, 30), "pixel limit"),
        (UploadLimits(), 0, (8, 8), "at least one photo"),
    ],
)
def test_upload_limits(tmp_path, limits, count, size, needle):
    files = [photo(tmp_path / f"{i}.png", size=size, color=(i * 60 % 255, 90, 160)) for i in range(count)]
    with pytest.raises(ValueError, match=needle):
        check_images(files, limits)


def test_rejected_upload_leaves_nothing(tmp_path):
    ws = Workspace(tmp_path / "w")
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    with pytest.raises(ValueError):
        ws.save_references([photo(tmp_path / "ok.png"), str(bad)], "dog")
    with pytest.raises(ValueError, match="class word"):
        ws.save_references([photo(tmp_path / "ok.png")], "../../etc")
    assert list((ws.root / "references").iterdir()) == []


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..", "a/b.mp4", "", "x.mp4.json", None])
def test_client_names_never_become_paths(ws, name):
    with pytest.raises((ValueError, FileNotFoundError)):
        ws.video_path(name)
    with pytest.raises((ValueError, FileNotFoundError)):
        ws.identity_path(name)


def test_identity_import_checks_contents(ws, tmp_path):
    good = identity_file(tmp_path / "mine.safetensors", token="<imp>")
    name, status = ui.on_import_identity(ws, str(good))
    assert name.startswith("dog-") and name != "mine.safetensors" and name in status
    assert (name in dict((n, l) for l, n in ws.identities()))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    before = sorted(p.name for p in (ws.root / "identities").iterdir())
    with pytest.raises(ValueError, match="not a magicme identity"):
        ws.import_identity(str(junk))
    assert sorted(p.name for p in (ws.root / "identities").iterdir()) == before


# ---- masks and training


def test_prepare_then_train_an_identity_with_a_live_loss_curve(ws, tmp_path):
    files = []
    for i in range(3):
        im = Image.new("RGB", (96, 96), (40, 90, 40))
        im.paste((230, 200, 60), (28 + 4 * i, 24, 70 + 4 * i, 76))  # the subject: a bright square on grass
        files.append(str(tmp_path / f"s{i}.png"))
        im.save(files[-1])
    name, _, _ = ui.on_upload(ws, files, "dog")
    assert ui.masks_view(ws, name) == ("Not prepared yet: make the masks.", None, [])
    with pytest.raises(ValueError, match="not prepared"):
        list(ui.on_train(ws, TINY_MODEL, name, "<tr>", 3, 1e-3, 2, True, 0))
    status, sheet, masks = ui.on_prepare(ws, name, "grabcut")
    assert "3 photo(s)" in status and Image.open(sheet).size[0] > 0 and len(masks) == 3
    mask = np.asarray(Image.open(masks[0][0])) > 127
    assert 0.05 < mask.mean() < 0.9  # a subject, not the whole frame or nothing
    seen = []
    outs = list(ui.on_train(ws, TINY_MODEL, name, "<tr>", 3, 1e-3, 2, True, 0, progress=lambda i, n: seen.append((i, n))))
    status, curve, ident = outs[-1]
    assert seen == [(1, 3), (2, 3), (3, 3)] and list(curve["step"]) == [1, 2, 3]
    assert str(outs[0][1]["loss"].dtype) == "float64"  # typed while empty, so the plot's axes are numeric
    assert np.isfinite(curve["loss"]).all() and ident and status.startswith("Done")
    info = dict((n, l) for l, n in ws.identities())[ident]
    assert info.startswith("<tr> (dog)")
    # the trained identity generates at once, through the same cached pipeline
    *_, (_, video, settings) = ui.on_generate(ws, TINY_MODEL, "a <tr> dog", "", [ident], 0.15, 2, 1, 0, 7.5, 8)
    assert settings["models"]["identities"][0]["token"] == "<tr>"
    # cancelling training writes no identity
    before = ws.identities()
    out = list(ui.on_train(ws, TINY_MODEL, name, "<tc>", 50, 1e-3, 2, True, 0, progress=lambda i, n: i == 2 and ws.cancel()))
    assert out[-1][0] == "Cancelled; no identity was written." and ws.identities() == before


# ---- generate, progress, cancel, model cache


def test_generate_handler_matches_cli_generate_and_records_settings(ws, tmp_path):
    seen = []
    outs = list(ui.on_generate(ws, TINY_MODEL, "a dog running", "", [], 0.3, 3, 2, 7, 7.5, 8, progress=lambda i, n: seen.append((i, n))))
    status, video, settings = outs[-1]
    assert status.startswith("Done") and seen == [(1, 2), (2, 2)]
    assert [o[0] for o in outs[1:-1]] == ["Denoising: step 1/2", "Denoising: step 2/2"]
    name = settings["output"]
    assert ws.videos()[0] == name and video == str(ws.video_path(name))
    assert (settings["gamma"], settings["seed"], settings["frames"], settings["steps"], settings["prompt"]) == (0.3, 7, 3, 2, "a dog running")
    assert ui.on_pick_video(ws, name) == (video, settings, None)
    assert any(n == name and lbl.startswith("a dog running") for lbl, n in ui.video_choices(ws))
    # the UI's clip is the library's: same frames as `generate` with the same settings
    cfg = GenerateConfig(prompts=["a dog running"], seeds=[7], frames=3, steps=2, gamma=0.3, models=ModelSpec())
    ref = generate(cfg, tmp_path / "ref.mp4", pipe=ws.pipeline(ModelSpec()), quiet=True)[0]
    assert np.array_equal(read_video(video), read_video(ref))


def test_generate_with_identity_and_prompt_token_check(ws, tmp_path):
    name = ws.import_identity(str(identity_file(tmp_path / "id.safetensors", token="<sks>", seed=3)))
    with pytest.raises(ValueError, match="does not contain the identity token"):
        list(ui.on_generate(ws, TINY_MODEL, "a dog", "", [name], 0.15, 2, 1, 0, 7.5, 8))
    *_, (status, video, settings) = ui.on_generate(ws, TINY_MODEL, "a <sks> dog", "", [name], 0.15, 2, 1, 0, 7.5, 8)
    assert settings["models"]["identities"][0]["token"] == "<sks>"
    with pytest.raises(ValueError, match="not a name from this work directory"):
        list(ui.on_generate(ws, TINY_MODEL, "a <sks> dog", "", ["../id.safetensors"], 0.15, 2, 1, 0, 7.5, 8))


def test_generate_long_clip_with_prompt_travel_and_preset_defaults(ws):
    travel = "0: a dog walks\n\n12: a dog runs"
    *_, (status, video, settings) = ui.on_generate(ws, TINY_MODEL, "", "", [], 0.15, 18, 1, 0, "", 8, travel, None, 2, "pyramid", None)
    assert read_video(video).shape[0] == 18
    assert settings["prompt_at"] == {"0": "a dog walks", "12": "a dog runs"}
    assert settings["windows"]["length"] == 16 and settings["windows"]["stride"] == 2
    assert settings["guidance"] == 7.5  # a blank field: the full preset's


@pytest.mark.parametrize(
    "model, fields, needle",
    [
        (TINY_MODEL, dict(gamma=1.0), "--gamma"),
        (TINY_MODEL, dict(frames=0), "--frames"),
        (TINY_MODEL, dict(seed=1.5), "seed"),
        (TINY_MODEL, dict(prompt="  "), "--prompt"),
        (("missing-model.safetensors", "", "", "ddim", "full"), {}, "missing-model"),
        (("tiny", "", "", "plms", "full"), {}, "--scheduler"),
        (("tiny", "", "", "ddim", "turbo"), {}, "--preset"),
        (TINY_MODEL, dict(prompt_travel="x: a cat"), "--prompt-at"),
        (TINY_MODEL, dict(prompt_travel="9: a cat"), "outside the clip"),
    ],
)
def test_generate_bad_input_raises_before_work(ws, model, fields, needle):
    args = dict(prompt="a dog", negative_prompt="", identities=[], gamma=0.15, frames=2, steps=1, seed=0, guidance=7.5, fps=8) | fields
    before = ws.videos()
    gen = ui.on_generate(ws, model, **args)
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        list(gen)
    assert ws.videos() == before


def test_cancel_stops_at_the_next_step_and_writes_nothing(ws):
    before = sorted(p.name for p in (ws.root / "videos").iterdir())
    steps = []

    def report(progress):
        steps.append(progress["step"])
        if progress["step"] == 2:
            assert ws.cancel() == 1

    cfg = GenerateConfig(prompts=["a dog"], frames=2, steps=10, models=ModelSpec())
    with pytest.raises(Cancelled):
        ws.generate(cfg, report)
    assert steps == [1, 2]
    assert sorted(p.name for p in (ws.root / "videos").iterdir()) == before
    outs = []
    gen = ui.on_generate(ws, TINY_MODEL, "a dog", "", [], 0.15, 2, 10, 0, 7.5, 8, progress=lambda i, n: i == 1 and ws.cancel())
    outs = list(gen)
    assert outs[-1] == ("Cancelled; nothing was written.", None, None)
    assert sorted(p.name for p in (ws.root / "videos").iterdir()) == before


def test_evaluate_handler_scores_like_evaluate_video_and_keeps_the_scores(ws, tmp_path):
    from magicme.evaluate import MetricModels, evaluate_video, save_tiny_metric_models

    metric = save_tiny_metric_models(tmp_path / "metric")
    set_name = ws.save_references([photo(tmp_path / f"{i}.png", color=(i * 90, 40, 200)) for i in range(2)], "dog")
    idname = ws.import_identity(str(identity_file(tmp_path / "e.safetensors", token="<ev>", seed=5)))
    *_, (_, _, settings) = ui.on_generate(ws, TINY_MODEL, "a <ev> dog", "", [idname], 0.15, 3, 1, 0, 7.5, 8)
    video = settings["output"]
    with pytest.raises(ValueError, match="reference set"):
        list(ui.on_evaluate(ws, video, None, metric.clip, metric.dino))
    outs = list(ui.on_evaluate(ws, video, set_name, metric.clip, metric.dino))
    table, scores = outs[-1]
    assert "CLIP-I" in table and f"{scores['clip_i']:.4f}" in table
    assert scores["scored_prompt"] == "a dog"  # the token replaced by the set's class word (§5.2)
    expected = evaluate_video(ws.video_path(video), ws.root / "references" / set_name / "images", "a <ev> dog",
                              token="<ev>", class_word="dog", models=MetricModels(clip=metric.clip, dino=metric.dino), device="cpu")
    for key in ("dino", "clip_i", "clip_t", "temporal_dino", "temporal_clip"):
        assert scores[key] == pytest.approx(expected[key], abs=1e-5)
    assert ui.on_pick_video(ws, video)[2] == scores
    scorer = ws._scorers[MetricModels(clip=metric.clip, dino=metric.dino)]
    list(ui.on_evaluate(ws, video, set_name, metric.clip, metric.dino))
    assert ws._scorers[MetricModels(clip=metric.clip, dino=metric.dino)] is scorer


def test_upscale_and_face_vcd_handlers_write_new_videos_with_their_settings(ws, tmp_path):
    idname = ws.import_identity(str(identity_file(tmp_path / "r.safetensors", token="<rf>", seed=7)))
    *_, (_, source, settings) = ui.on_generate(ws, TINY_MODEL, "a <rf> dog", "", [idname], 0.15, 3, 1, 0, 7.5, 8)
    name = settings["output"]
    assert ui.refine_defaults(ws, name) == ("a <rf> dog", [idname])
    outs = list(ui.on_refine(ws, TINY_MODEL, "upscale", name, "a <rf> dog", [idname], "", 5, 1, 2))
    status, video, up = outs[-1]
    assert status.startswith("Done") and any(o[0] == "Tiled VCD: denoising step 1" for o in outs)
    assert read_video(video).shape == (3, 128, 128, 3)
    assert (up["task"], up["strength"], up["scale"]) == ("upscale", 0.2, 2)  # §5.2's 20 % by default
    assert up["input"]["path"] == str(ws.video_path(name))
    # no face in tiny noise: Face VCD keeps the clip and says so
    *_, (status, video, face) = ui.on_refine(ws, TINY_MODEL, "face", name, "a <rf> dog", [idname], "", 2, 0)
    assert "no face found" in status and face["strength"] == 0.8
    assert np.abs(read_video(video).astype(int) - read_video(source).astype(int)).mean() < 4  # only one more lossy H.264 pass
    # with a face: only the face square changes, and cancelling stops it with nothing written
    from magicme.face import FaceConfig

    cfg = FaceConfig(prompt="a <rf> dog", steps=4, identities=[idname], models=ModelSpec())
    new = ws.refine("face", name, cfg, detector=lambda frame: [(16, 16, 24, 24)])
    before, after = read_video(source).astype(int), read_video(ws.video_path(new)).astype(int)
    assert ws.video_settings(new)["faces"] == 1
    assert np.abs(after - before)[:, 20:36, 20:36].mean() > 4 * np.abs(after - before)[:, :4, :4].mean()
    count = len(ws.videos())
    with pytest.raises(Cancelled):
        ws.refine("face", name, cfg, report=lambda p: ws.cancel(), detector=lambda frame: [(16, 16, 24, 24)])
    assert len(ws.videos()) == count
    with pytest.raises(ValueError, match="stage"):
        ws.refine("v2v", name, cfg)


def test_pipeline_loaded_once_per_spec_and_reloaded_for_a_retrained_token(ws, tmp_path):
    spec = ModelSpec()
    pipe = ws.pipeline(spec)
    assert ws.pipeline(spec) is pipe
    first = identity_file(tmp_path / "a.safetensors", token="<re>", seed=1)
    assert ws.pipeline(spec, [first]) is pipe
    same_token = identity_file(tmp_path / "b.safetensors", token="<re>", seed=2)
    fresh = ws.pipeline(spec, [same_token])
    assert fresh is not pipe
    ids = fresh.tokenizer.convert_tokens_to_ids(["<re>"])
    emb = fresh.text_encoder.get_input_embeddings().weight[ids[0]]
    assert torch.allclose(emb, torch.randn(2, 32, generator=torch.Generator().manual_seed(2))[0])
    assert ws.pipeline(ModelSpec(scheduler="euler")) is not fresh


def test_stream_yields_progress_then_result_and_reraises():
    assert list(stream(lambda report: [report(i) for i in range(3)] and "ok")) == [
        ("progress", 0), ("progress", 1), ("progress", 2), ("done", "ok")]

    def fail(report):
        report("x")
        raise ValueError("boom")

    gen = stream(fail)
    assert next(gen) == ("progress", "x")
    with pytest.raises(ValueError, match="boom"):
        next(gen)


def test_one_model_job_at_a_time(ws):
    inside, peak = [0], [0]
    lock = threading.Lock()

    def work(check):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        threading.Event().wait(0.05)
        with lock:
            inside[0] -= 1

    threads = [threading.Thread(target=ws.run_job, args=(work,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1


# ---- the app and the command


def test_app_builds_with_the_workflow_and_lists_what_exists(ws):
    import gradio as gr

    app = ui.build_app(workspace=ws)
    assert isinstance(app, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"photos", "class_word", "save_photos", "prompt", "identities", "gamma", "frames", "seed",
            "generate", "cancel_generate", "gen_video", "gen_settings", "library", "lib_settings"} <= ids
    picker = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "video_pick")
    assert [v for _, v in picker.choices] == ws.videos()
    assert app.magicme_workspace is ws


def test_cli_ui_checks_arguments_then_serves(monkeypatch, tmp_path, capsys):
    from magicme.cli import main

    calls = []
    monkeypatch.setattr(ui, "launch", lambda app, host, port, quiet: calls.append((app.magicme_workspace.root, host, port)))
    assert main(["ui", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--port" in err[0]
    assert calls == []
    assert main(["ui", "--port", "7999", "--workdir", str(tmp_path / "w")]) == 0
    assert calls == [((tmp_path / "w").resolve(), "127.0.0.1", 7999)]
    assert "http://127.0.0.1:7999" in capsys.readouterr().out
