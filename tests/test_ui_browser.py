"""End to end: the web UI served on loopback, driven in Debian's headless Chromium (no browser download).

One browser uploads photos (one of them unreadable), paints a mask, trains a few steps with a
checkpoint preview, generates two seeds with a live preview, meets an error with a `<v*>` token that
stays on the page, browses the gallery, reuses a clip's settings, upscales and scores the refined clip,
and cancels. A second browser, with its own local storage, sees none of it and waits in the queue.
Every request that would leave the machine is blocked and counted. Screenshots go to test-artifacts/.
"""

import re
import socket
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: install Debian's chromium (.ci/run does) to run the browser test"
)
pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from magicme import ui

    app = ui.build_app(tmp_path_factory.mktemp("uiwork"), device="cpu")  # one workspace per browser
    port = free_port()
    ui.launch(app, "127.0.0.1", port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/", app.magicme_workspaces
    app.close()


@pytest.fixture(scope="module")
def browser(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url):
    """A page in a fresh browser context (its own local storage: another browser, as far as the UI can tell)."""
    external = []

    def only_loopback(route):
        if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    context = browser.new_context(viewport={"width": 1280, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(180_000)
    page.route("**/*", only_loopback)
    page.goto(url)
    page.get_by_text("Save photos").wait_for()
    page.wait_for_function("() => document.querySelector('#where') && document.querySelector('#where').innerText.includes('workspaces/')")
    page.external = external
    return page


def type_into(page, selector: str, text: str) -> None:
    """Fill a field and leave it, again if the page was still settling the field's first value over ours."""
    box = page.locator(selector)
    for _ in range(5):
        box.fill(text)
        box.blur()
        page.wait_for_timeout(500)
        if box.input_value() == text:
            return
    raise AssertionError(f"{selector} did not keep {text!r}")


@pytest.fixture(scope="module")
def page(server, browser):
    return open_page(browser, server[0])


def workspace(server, page):
    """The workspace this page's browser opened (named on the page)."""
    _, spaces = server
    wid = re.search(r"workspaces/([\w-]+)/", page.locator("#where").inner_text()).group(1)
    return spaces.get(wid)


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def generate_clip(page, prompt, frames, steps):
    """Fill the Generate tab's prompt, frames and steps and start the job."""
    page.get_by_role("tab", name="2 · Generate").click()
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#frames input").fill(str(frames))
    page.locator("#steps textarea").fill(str(steps))
    page.locator("#generate").click()


def test_page_renders_offline_with_the_tiny_warning_in_sight(page):
    assert page.title() == "magicme"
    warning = page.locator("#tiny_warning")
    assert warning.is_visible() and "coloured noise" in warning.inner_text()
    page.get_by_role("button", name="Model ▼").click()
    type_into(page, "#base textarea", "owner/real-model")
    warning.wait_for(state="hidden")
    type_into(page, "#base textarea", "tiny")
    warning.wait_for(state="visible")
    assert page.external == []


def test_upload_skips_an_unreadable_photo_by_name(page, server, tmp_path):
    files = []
    for i, color in enumerate([(220, 40, 40), (40, 200, 60), (30, 60, 220)]):
        im = Image.new("RGB", (96, 80), (40, 90, 40))
        im.paste(color, (20 + 8 * i, 20, 60 + 8 * i, 70))
        files.append(str(tmp_path / f"ref{i}.jpg"))
        im.save(files[-1], format="JPEG")
    bad = tmp_path / "IMG_7.jpg"
    bad.write_bytes(b"<script>alert(1)</script>")
    page.locator("#photos input[type=file]").set_input_files([files[0], str(bad), *files[1:]])
    page.locator("#class_word textarea").fill("dog")
    page.locator("#save_photos").click()
    status = page.locator("#upload_status")
    status.get_by_text("Stored 3 photo(s) of a dog").wait_for()
    assert "Skipped 1: IMG_7.jpg: not a readable image" in status.inner_text()
    assert page.locator("#ref_images img").count() == 3
    ws = workspace(server, page)
    (name,) = ws.reference_sets()
    assert len(ws.reference_set(name)[0]) == 3
    shot(page, "ui_photos.png")


def stroke(page, dx0, dy0, dx1, dy1):
    """Drag the mouse over the mask editor's canvas, in pixels from its centre."""
    box = page.locator("#mask_editor canvas").first.bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx + dx0, cy + dy0)
    page.mouse.down()
    for k in range(1, 21):
        page.mouse.move(cx + dx0 + (dx1 - dx0) * k / 20, cy + dy0 + (dy1 - dy0) * k / 20)
    page.mouse.up()


def test_masks_are_painted_in_the_editor(page, server):
    ws = workspace(server, page)
    page.locator("#prepare").click()
    page.locator("#prepare_status").get_by_text("Masks of 3 photo(s)").wait_for()
    assert page.locator("#masks img").count() == 3
    (name,) = ws.reference_sets()
    _, before = ws.mask(name, 1)
    page.locator("#masks img").nth(1).click()
    page.locator("#mask_status").get_by_text("Mask 2: paint with red").wait_for()
    page.get_by_role("button", name="Brush", exact=True).click()
    stroke(page, -150, -150, -40, -130)  # red, above the subject: added
    page.locator("#mask_editor button[title=Color]").click()
    page.locator("#mask_editor menu.swatch button.color").nth(1).click()
    stroke(page, -30, -10, 40, 30)  # blue, across the subject: removed
    shot(page, "ui_mask_painting.png")
    page.locator("#save_mask").click()
    page.locator("#mask_status").get_by_text("Saved mask 2; training uses it.").wait_for()
    _, after = ws.mask(name, 1)
    assert (after & ~before).sum() > 500 and (before & ~after).sum() > 500
    assert "1 painted by you" in page.locator("#prepare_status").inner_text()


def test_train_shows_the_loss_and_a_checkpoint_preview(page, server):
    ws = workspace(server, page)
    page.locator("#train_steps input").fill("2")
    page.locator("#train_preview_every input").fill("2")
    page.locator("#train").click()
    page.locator("#train_status").get_by_text("Done: identity").wait_for()
    assert "(token <v*>)" in page.locator("#train_status").inner_text()  # shown whole, not eaten as HTML
    (label, _), = ws.identities()
    assert label.startswith("<v*> (dog)")
    page.locator("#loss_plot canvas, #loss_plot svg").first.wait_for()
    page.locator("#checkpoints img").first.wait_for()
    assert page.locator("#checkpoints").get_by_text("step 2").count() >= 1
    shot(page, "ui_train.png")


def test_an_error_naming_the_token_is_shown_whole_and_stays(page):
    page.get_by_role("tab", name="2 · Generate").click()
    page.locator("#identities").get_by_text("<v*> (dog)").wait_for()  # the identity trained above is picked
    page.locator("#prompt textarea").fill("a dog on the beach")
    page.locator("#frames input").fill("4")
    page.locator("#steps textarea").fill("2")
    page.locator("#generate").click()
    status = page.locator("#gen_status")
    status.get_by_text("does not contain the identity token").wait_for()
    expected = "Error: Prompt 'a dog on the beach' does not contain the identity token '<v*>'; write it e.g. as 'a <v*> dog'"
    assert status.inner_text().strip() == expected
    page.wait_for_timeout(12_000)  # longer than a toast lives
    assert status.inner_text().strip() == expected and status.locator(".mm-error").is_visible()
    assert "Loading" not in status.inner_text()
    shot(page, "ui_error.png")


def test_generate_two_seeds_with_a_live_preview(page, server):
    ws = workspace(server, page)
    page.locator("#random_seed").click()
    page.wait_for_function("() => /^\\d+$/.test(document.querySelector('#seeds textarea').value) && document.querySelector('#seeds textarea').value !== '0'")
    page.locator("#prompt textarea").fill("a <v*> dog on the beach")
    page.locator("#seeds textarea").fill("5, 6")
    page.locator("#steps textarea").fill("4")
    page.locator("#preview_every input").fill("2")
    page.locator("#generate").click()
    page.locator("#preview img").wait_for()  # frames decoded while denoising
    page.locator("#gen_status").get_by_text("Done: 2 clip(s)").wait_for()
    page.wait_for_function("() => { const v = document.querySelector('#gen_video video'); return v && v.readyState >= 1; }")
    assert page.locator("#gen_video video").evaluate("v => v.error === null && v.videoWidth === 64 && v.videoHeight === 64")
    assert page.locator("#gen_clips img").count() == 2
    assert page.locator("#gen_clips").get_by_text("seed 5").count() == 1
    names = ws.videos()
    assert [ws.video_settings(n)["seed"] for n in names] == [6, 5]
    assert ws.video_settings(names[0])["models"]["identities"][0]["token"] == "<v*>"
    assert page.locator("#gen_settings").get_by_text("a <v*> dog on the beach").count() >= 1
    shot(page, "ui_generate.png")
    assert page.external == []


def test_gallery_opens_a_clip_and_reuse_fills_the_form(page, server):
    ws = workspace(server, page)
    page.get_by_role("tab", name="3 · Videos").click()
    library = page.locator("#library")
    library.locator("img").nth(1).wait_for()
    assert library.get_by_text(re.compile(r"a <v\*> dog on the beach · seed 5")).count() == 1  # readable captions
    library.locator("img").nth(1).click()
    oldest = ws.videos()[1]
    page.locator("#lib_settings").get_by_text(oldest).wait_for()
    page.get_by_role("tab", name="2 · Generate").click()
    page.locator("#prompt textarea").fill("")
    page.locator("#seeds textarea").fill("0")
    page.get_by_role("tab", name="3 · Videos").click()
    page.locator("#reuse").click()
    page.locator("#seeds textarea").wait_for()
    page.wait_for_function("() => document.querySelector('#seeds textarea').value === '5'")
    assert page.locator("#prompt textarea").input_value() == "a <v*> dog on the beach"
    assert page.locator("#steps textarea").input_value() == "4"
    shot(page, "ui_reuse.png")
    page.get_by_role("tab", name="3 · Videos").click()
    page.locator("#video_status").get_by_text("The Generate form now holds the settings").wait_for()
    shot(page, "ui_videos.png")


def test_upscale_then_score_the_refined_clip(page, server, tmp_path):
    from magicme.evaluate import save_tiny_metric_models

    ws = workspace(server, page)
    source = ws.videos()[1]
    assert page.locator("#refine_prompt textarea").input_value() == "a <v*> dog on the beach"  # from the picked clip
    page.locator("#refine_steps input").fill("5")
    page.locator("#upscale").click()
    page.locator("#refine_status").get_by_text("It is now the picked clip").wait_for()
    page.wait_for_function("() => { const v = document.querySelector('#refine_video video'); return v && v.readyState >= 1; }")
    assert page.locator("#refine_video video").evaluate("v => v.error === null && v.videoWidth === 128")
    refined = ws.videos()[0]
    assert ws.video_settings(refined)["task"] == "upscale" and ws.video_source(refined) == source
    metric = save_tiny_metric_models(tmp_path / "metric")
    page.locator("#eval_set input").click()
    page.get_by_role("option", name=ws.reference_sets()[0]).click()
    page.locator("#clip_model textarea").fill(metric.clip)
    page.locator("#dino_model textarea").fill(metric.dino)
    page.locator("#evaluate").click()
    page.locator("#eval_status").get_by_text(f"Scored {refined}").wait_for()
    scores = ws.metrics(refined)
    assert scores["scored_prompt"] == "a dog on the beach"
    row = page.locator("#scores tr").nth(1).locator("td")
    assert row.first.inner_text() == "this clip" and row.nth(1).inner_text() == f"{scores['dino']:.4f}"
    shot(page, "ui_refine_scores.png")


def test_a_second_browser_has_its_own_workspace_and_waits_in_the_queue(page, server, browser):
    ws = workspace(server, page)
    other = open_page(browser, server[0])
    other_ws = workspace(server, other)
    assert other_ws.root != ws.root
    assert other_ws.videos() == [] and other.locator("#library img").count() == 0
    assert other.locator("#ref_images img").count() == 0 and other.locator("#ref_set input").input_value() == ""
    # a long job in the first browser; the second one's job waits for it instead of failing
    before = ws.videos()
    page.get_by_role("tab", name="2 · Generate").click()
    page.locator("#prompt textarea").fill("a <v*> dog")
    page.locator("#seeds textarea").fill("1")
    page.locator("#steps textarea").fill("999")  # minutes of work: only Cancel ends it in time
    page.locator("#generate").click()
    page.locator("#gen_status").get_by_text("Denoising: step").wait_for()
    generate_clip(other, "a cat", frames=2, steps=1)
    other.locator("#gen_status").get_by_text("Waiting for 1 job ahead of this one").wait_for()
    shot(other, "ui_queued.png")
    other.locator("#cancel_generate").click()  # cancels its own job only
    other.locator("#gen_status").get_by_text("Cancelled; nothing was written.").wait_for()
    assert "Denoising: step" in page.locator("#gen_status").inner_text()
    page.locator("#cancel_generate").click()
    try:
        page.locator("#gen_status").get_by_text("Cancelled; nothing was written.").wait_for(timeout=120_000)
    finally:
        shot(page, "ui_cancelled.png")
    assert ws.videos() == before and other_ws.videos() == []
    # the same browser comes back to its own workspace after a reload
    page.reload()
    page.wait_for_function("() => document.querySelector('#where') && document.querySelector('#where').innerText.includes('workspaces/')")
    assert workspace(server, page).root == ws.root
    page.get_by_role("tab", name="3 · Videos").click()
    page.locator("#library img").nth(len(before) - 1).wait_for()
    other.context.close()


def test_bad_upload_is_refused_with_a_message(page, server, tmp_path):
    ws = workspace(server, page)
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"<script>alert(1)</script>")
    before = ws.reference_sets()
    page.get_by_role("tab", name="1 · Photos & identity").click()
    page.locator("#photos input[type=file]").set_input_files(str(fake))
    page.locator("#class_word textarea").fill("dog")
    page.locator("#save_photos").click()
    page.locator("#upload_status").get_by_text("none of the 1 file(s) is a usable photo (photo.png: not a readable image").wait_for()
    assert ws.reference_sets() == before
    assert page.locator("#upload_status .mm-error").is_visible()


def test_with_auth_a_login_opens_its_own_workspace_from_any_browser(browser, tmp_path):
    from magicme import ui
    from magicme.workspace import Workspaces

    app = ui.build_app(tmp_path / "w", device="cpu")
    port = free_port()
    ui.launch(app, "127.0.0.1", port, block=False, quiet=True, auth=[("ann", "pw-ann"), ("bob", "pw-bob")])
    try:
        seen = []
        for user in ("ann", "bob", "ann"):
            context = browser.new_context()
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("input[type=text]").first.fill(user)
            page.locator("input[type=password]").fill(f"pw-{user}")
            page.keyboard.press("Enter")
            page.wait_for_function("() => document.querySelector('#where') && document.querySelector('#where').innerText.includes('workspaces/')")
            seen.append(re.search(r"workspaces/([\w-]+)/", page.locator("#where").inner_text()).group(1))
            context.close()
        assert seen == [Workspaces.for_user("ann"), Workspaces.for_user("bob"), Workspaces.for_user("ann")]
    finally:
        app.close()


def test_model_section_takes_loras_freeu_clip_skip_and_the_reference_preset(server, browser, tmp_path):
    import torch
    from lora_files import animatediff_motion_lora_layout, kohya_layout, random_lora, random_motion_lora
    from safetensors.torch import save_file

    from magicme.models import ModelSpec, load_pipeline

    pipe = load_pipeline(ModelSpec(), device="cpu")
    style, zoom = tmp_path / "ghibli style.safetensors", tmp_path / "v2_lora_ZoomIn.ckpt"
    save_file(kohya_layout(random_lora(pipe.unet, pipe.text_encoder)), str(style))
    torch.save(animatediff_motion_lora_layout(random_motion_lora(pipe.unet)), zoom)
    page = open_page(browser, server[0])
    ws = workspace(server, page)
    page.get_by_role("button", name="Model ▼").click()
    page.locator("#loras_files input[type=file]").set_input_files(str(zoom))  # a motion LoRA in the LoRA box
    page.locator("#model_status").get_by_text("is an AnimateDiff motion LoRA").wait_for()
    assert page.locator("#model_status .mm-error").is_visible() and ws.loras() == []
    shot(page, "ui_model_wrong_lora.png")
    page.locator("#loras_files input[type=file]").set_input_files(str(style))
    page.locator("#model_status").get_by_text("Added ghibli-style-").wait_for()
    (name,) = ws.loras()
    assert page.locator("#loras textarea").input_value() == f"{name}:1.0"
    page.locator("#loras textarea").fill(f"{name}:0.7")
    page.locator("#motion_loras_files input[type=file]").set_input_files(str(zoom))
    page.wait_for_function("() => document.querySelector('#motion_loras textarea').value.endsWith(':1.0')")
    page.locator("#freeu textarea").fill("on")
    page.locator("#clip_skip input").fill("1")
    page.locator("#preset input").click()
    page.get_by_role("option", name="reference").click()
    generate_clip(page, "a watercolour dog", frames=2, steps=2)
    page.locator("#gen_status").get_by_text("Done: 1 clip(s)").wait_for()
    models = ws.video_settings(ws.videos()[0])["models"]
    assert (models["preset"], models["scheduler"], models["clip_skip"]) == ("reference", "dpmpp-2m-karras", 1)
    assert models["freeu"] == {"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2}
    assert [e["scale"] for e in models["loras"]] == [0.7] and [e["scale"] for e in models["motion_loras"]] == [1.0]
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "ui_model_options.png")
    assert page.external == []
    page.context.close()


def test_wan_backbone_hides_the_animatediff_fields_and_generates_with_its_defaults(server, browser):
    page = open_page(browser, server[0])
    ws = workspace(server, page)
    page.get_by_role("button", name="Model ▼").click()
    assert page.locator("#motion_adapter").is_visible() and not page.locator("#form").is_visible()
    page.locator("#backbone input").click()
    page.get_by_role("option", name="wan").click()
    page.locator("#motion_adapter").wait_for(state="hidden")
    assert not page.locator("#preset").is_visible() and page.locator("#form").is_visible() and page.locator("#lora_rank").is_visible()
    page.get_by_role("tab", name="2 · Generate").click()
    page.wait_for_function("() => document.querySelector('#frames input')?.value === '81'")  # Wan's clip: 81 frames at 16 fps
    assert page.locator("#fps input").input_value() == "16"
    assert page.locator("#wan_note").is_visible() and page.locator("#steps textarea").get_attribute("placeholder") == "Wan's 50"
    page.locator("#width textarea").fill("32")
    page.locator("#height textarea").fill("32")
    generate_clip(page, "a dog on the beach", frames=5, steps=2)
    page.locator("#gen_status").get_by_text("Done: 1 clip(s)").wait_for()
    page.wait_for_function("() => { const v = document.querySelector('#gen_video video'); return v && v.readyState >= 1; }")
    record = ws.video_settings(ws.videos()[0])
    assert (record["backbone"], record["frames"], record["fps"], record["guidance"], record["width"]) == ("wan", 5, 16, 5.0, 32)
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "ui_wan.png")
    assert page.external == []
    page.context.close()
