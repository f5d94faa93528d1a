"""End to end: the web UI served on loopback, driven in Debian's headless Chromium (no browser download).

Uploads photos, imports an identity, generates a clip with it and checks that the page plays it, while
every request that would leave the machine is blocked and counted. Screenshots go to test-artifacts/.
"""

import re
import socket
from pathlib import Path

import pytest
import torch
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

    app = ui.build_app(tmp_path_factory.mktemp("uiwork"), device="cpu")
    port = free_port()
    ui.launch(app, "127.0.0.1", port, block=False, quiet=True)
    yield f"http://127.0.0.1:{port}/", app.magicme_workspace
    app.close()


@pytest.fixture(scope="module")
def page(server):
    url, _ = server
    external = []

    def only_loopback(route):
        if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.set_default_timeout(120_000)
        page.route("**/*", only_loopback)
        page.goto(url)
        page.external = external
        yield page
        browser.close()


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_page_renders_offline(page):
    page.get_by_text("Save photos").wait_for()
    assert page.title() == "magicme"
    assert page.external == []


def test_upload_photos(page, server, tmp_path):
    _, ws = server
    files = []
    for i, color in enumerate([(220, 40, 40), (40, 200, 60), (30, 60, 220)]):
        files.append(str(tmp_path / f"ref{i}.jpg"))
        Image.new("RGB", (96, 80), color).save(files[-1], format="JPEG")
    page.locator("#photos input[type=file]").set_input_files(files)
    page.locator("#class_word textarea").fill("dog")
    page.locator("#save_photos").click()
    page.locator("#upload_status").get_by_text("Stored 3 photo(s) of a dog").wait_for()
    assert page.locator("#ref_images img").count() == 3
    (name,) = ws.reference_sets()
    assert len(ws.reference_set(name)[0]) == 3
    shot(page, "ui_photos.png")


def test_masks_and_train_a_few_steps(page, server):
    _, ws = server
    page.locator("#prepare").click()
    page.locator("#prepare_status").get_by_text("Masks of 3 photo(s)").wait_for()
    assert page.locator("#masks img").count() == 3
    page.locator("#contact_sheet img").wait_for()
    page.locator("#train_steps input").fill("6")
    page.locator("#train").click()
    page.locator("#train_status").get_by_text("Done: identity").wait_for()
    (label, name), = ws.identities()
    assert label.startswith("<v*> (dog)")
    page.locator("#loss_plot canvas, #loss_plot svg").first.wait_for()
    shot(page, "ui_train.png")


def test_import_identity_generate_and_play(page, server, tmp_path):
    from magicme.identity import IdentityInfo, save_identity

    _, ws = server
    emb = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    idfile = save_identity(tmp_path / "id.safetensors", emb, IdentityInfo(token="<imp>", class_word="cat", num_vectors=2))
    page.locator("#id_file input[type=file]").set_input_files(str(idfile))
    page.locator("#import_identity").click()
    page.get_by_text("Imported identity").wait_for()
    assert len(ws.identities()) == 2

    page.get_by_role("tab", name="2 · Generate").click()
    page.locator("#prompt textarea").fill("a <v*> dog on the beach")
    # the identity trained above is picked already
    page.locator("#identities").get_by_text("<v*> (dog)").wait_for()
    page.locator("#frames input").fill("4")
    page.locator("#steps textarea").fill("3")
    page.locator("#seed input").fill("5")
    page.locator("#generate").click()
    page.locator("#gen_status").get_by_text("Done").wait_for()
    video = page.locator("#gen_video video")
    video.wait_for()
    # the browser decodes the clip: metadata loaded, no media error, the 64×64 tiny size
    page.wait_for_function("() => { const v = document.querySelector('#gen_video video'); return v && v.readyState >= 1; }")
    assert video.evaluate("v => v.error === null && v.videoWidth === 64 && v.videoHeight === 64")
    (name,) = ws.videos()
    settings = ws.video_settings(name)
    assert (settings["seed"], settings["frames"], settings["steps"]) == (5, 4, 3)
    assert (settings["guidance"], settings["free_init"], settings["context_length"]) == (7.5, None, None)  # blank fields
    assert settings["models"]["identities"][0]["token"] == "<v*>"
    assert page.locator("#gen_settings").get_by_text("a <v*> dog on the beach").count() >= 1
    shot(page, "ui_generate.png")

    page.get_by_role("tab", name="3 · Videos").click()
    page.locator("#library video, #library img").first.wait_for()
    page.get_by_role("button", name="Thumbnail 1 of 1").click()
    page.locator("#lib_settings").get_by_text(name).wait_for()
    page.locator("#lib_video video").wait_for()
    assert page.external == []


def test_score_the_video(page, server, tmp_path):
    from magicme.evaluate import save_tiny_metric_models

    _, ws = server
    metric = save_tiny_metric_models(tmp_path / "metric")
    (name,) = ws.videos()
    page.locator("#eval_set input").click()
    page.get_by_role("option", name=ws.reference_sets()[0]).click()
    page.locator("#clip_model textarea").fill(metric.clip)
    page.locator("#dino_model textarea").fill(metric.dino)
    page.locator("#evaluate").click()
    page.locator("#eval_status table").get_by_text("CLIP-I").wait_for()
    scores = ws.metrics(name)
    assert scores["reference_set"] == ws.reference_sets()[0] and scores["scored_prompt"] == "a dog on the beach"
    assert page.locator("#eval_status td").first.inner_text() == f"{scores['dino']:.4f}"
    shot(page, "ui_videos.png")


def test_upscale_the_video(page, server):
    _, ws = server
    (name,) = ws.videos()
    assert page.locator("#refine_prompt textarea").input_value() == "a <v*> dog on the beach"  # from the picked video
    page.locator("#refine_steps input").fill("5")
    page.locator("#upscale").click()
    page.locator("#refine_status").get_by_text("Done").wait_for()
    page.wait_for_function("() => { const v = document.querySelector('#refine_video video'); return v && v.readyState >= 1; }")
    assert page.locator("#refine_video video").evaluate("v => v.error === null && v.videoWidth === 128")
    new = ws.videos()[0]
    assert new != name and ws.video_settings(new)["task"] == "upscale"
    shot(page, "ui_refine.png")


def test_cancel_stops_a_running_generation(page, server):
    _, ws = server
    before = ws.videos()
    page.get_by_role("tab", name="2 · Generate").click()
    page.locator("#prompt textarea").fill("a <v*> dog")  # the identity picked above stays picked
    page.locator("#frames input").fill("8")
    page.locator("#steps textarea").fill("999")  # minutes of work: only Cancel ends it in time
    page.locator("#generate").click()
    try:
        page.locator("#gen_status").get_by_text("Denoising: step").wait_for()
    finally:
        shot(page, "ui_cancel.png")
    page.locator("#cancel_generate").click()
    try:
        page.locator("#gen_status").get_by_text("Cancelled; nothing was written.").wait_for(timeout=60_000)
    finally:
        shot(page, "ui_cancelled.png")
    assert ws.videos() == before


def test_bad_upload_is_refused_with_a_message(page, server, tmp_path):
    _, ws = server
    fake = tmp_path / "photo.png"
    fake.write_bytes(b"<script>alert(1)</script>")
    before = ws.reference_sets()
    page.get_by_role("tab", name="1 · Photos & identity").click()
    page.locator("#photos input[type=file]").set_input_files(str(fake))
    page.locator("#save_photos").click()
    page.get_by_text(re.compile(r"photo \d: not a readable image")).first.wait_for()
    assert ws.reference_sets() == before
