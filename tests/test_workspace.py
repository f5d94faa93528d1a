"""The web UI's storage: the UI's own folder, one workspace per browser or login, checked uploads, user masks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from magicme.generate import GenerateConfig
from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec
from magicme.workspace import MARK, UploadLimits, Workspace, Workspaces, read_photo, read_photos


def photo(path, fmt="PNG", size=(40, 30), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path, format=fmt)
    return str(path)


def identity_file(path, token="<v*>", seed=0):
    emb = torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))
    return save_identity(path, emb, IdentityInfo(token=token, class_word="dog", num_vectors=2, base="tiny"))


# ---- the UI's own folder


def test_workdir_naming_a_users_folder_keeps_the_ui_in_its_own_marked_subfolder(tmp_path):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("secret")
    spaces = Workspaces(home)
    assert spaces.root == home / "workspaces" and (spaces.root / MARK).is_file()
    assert Workspaces(home).root == spaces.root  # its own folder is accepted again
    taken = tmp_path / "other"
    (taken / "workspaces").mkdir(parents=True)
    (taken / "workspaces" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by magicme ui"):
        Workspaces(taken)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        Workspaces(tmp_path / "file")


def test_each_browser_and_each_login_gets_its_own_workspace(tmp_path):
    spaces = Workspaces(tmp_path / "w")
    key_a, wid_a = spaces.for_browser(None)
    key_b, wid_b = spaces.for_browser("")
    assert key_a != key_b and wid_a != wid_b
    assert spaces.for_browser(key_a) == (key_a, wid_a)  # the same browser comes back to its own
    assert key_a not in wid_a  # the folder name does not reveal the key
    forged, wid = spaces.for_browser("../../etc")
    assert forged != "../../etc" and wid not in (wid_a, wid_b)
    assert spaces.for_user("ann") == spaces.for_user("ann") != spaces.for_user("bob")
    for bad in ("../x", "shared/..", "b-" + "0" * 23, None, "u-../../etc"):
        with pytest.raises(ValueError, match="reload the page"):
            spaces.get(bad)
    a, b = spaces.get(wid_a), spaces.get(wid_b)
    assert spaces.get(wid_a) is a and a.runner is b.runner  # one model cache, one queue
    name, _ = a.save_references([photo(tmp_path / "p.png")], "dog")
    assert a.reference_sets() == [name] and b.reference_sets() == []
    with pytest.raises(FileNotFoundError):
        b.reference_set(name)
    ident = a.import_identity(str(identity_file(tmp_path / "i.safetensors")))
    assert b.identities() == []
    with pytest.raises(FileNotFoundError):
        b.identity_path(ident)


def test_one_workspace_cannot_cancel_or_use_anothers_identity(tmp_path):
    spaces = Workspaces(tmp_path / "w")
    a, b = (spaces.get(spaces.for_browser(None)[1]) for _ in range(2))
    ident = a.import_identity(str(identity_file(tmp_path / "i.safetensors", token="<sks>")))
    cfg = GenerateConfig(prompts=["a <sks> dog"], frames=2, steps=1, models=ModelSpec())
    a.generate(GenerateConfig(prompts=["a <sks> dog"], frames=2, steps=1, identities=[ident], models=ModelSpec()))
    pipe = a.runner.pipeline(ModelSpec())
    assert "<sks>" not in pipe.tokenizer.get_vocab()  # b's prompt cannot reach a's identity through the shared model
    with pytest.raises(FileNotFoundError):
        b.generate(GenerateConfig(prompts=["a <sks> dog"], frames=2, steps=1, identities=[ident], models=ModelSpec()))
    job = a.new_job("generate")
    assert b.cancel(job.id) == 0 and not job.cancelled.is_set()
    assert a.cancel(job.id) == 1 and job.cancelled.is_set()
    b.generate(cfg)  # the token is plain text for b


# ---- uploads


def test_photos_are_checked_by_content_and_an_unreadable_one_is_skipped_by_name(tmp_path):
    fake = tmp_path / "IMG_7.png"
    fake.write_bytes(b"#!/bin/sh\necho not an image\n")
    gif = tmp_path / "anim.png"
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    tiny = photo(tmp_path / "dot.png", size=(1, 1))
    good = [photo(tmp_path / "evil name.jpg", "JPEG"), photo(tmp_path / "b.webp", "WEBP", size=(16, 24))]
    images, names, skipped = read_photos([good[0], str(fake), str(gif), tiny, good[1]])
    assert names == ["evil name.jpg", "b.webp"] and [im.size for im in images] == [(40, 30), (16, 24)]
    assert skipped == ["IMG_7.png: not a readable image (UnidentifiedImageError)",
                       "anim.png: GIF content, expected JPEG/PNG/WEBP",
                       "dot.png: 1×1 pixels is too small (at least 16 a side)"]
    with pytest.raises(ValueError, match="none of the 2 file.*IMG_7.png: not a readable image"):
        read_photos([str(fake), tiny])
    truncated = tmp_path / "t.png"
    photo(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="not a readable image"):
        read_photo(truncated)


@pytest.mark.parametrize(
    "limits, count, size, needle",
    [
        (UploadLimits(max_files=2), 3, (16, 16), "3 files uploaded, at most 2"),
        (UploadLimits(max_bytes=100), 1, (64, 64), "over the 0 MiB limit"),
        (UploadLimits(max_pixels=1000), 1, (40, 30), "pixel limit"),
        (UploadLimits(), 0, (16, 16), "at least one photo"),
    ],
)
def test_upload_limits(tmp_path, limits, count, size, needle):
    files = [photo(tmp_path / f"{i}.png", size=size, color=(i * 60 % 255, 90, 160)) for i in range(count)]
    with pytest.raises(ValueError, match=needle):
        read_photos(files, limits)


def test_stored_sets_use_generated_names_and_a_refused_upload_leaves_nothing(tmp_path):
    ws = Workspace(tmp_path / "w")
    name, skipped = ws.save_references([photo(tmp_path / "../x.png"), photo(tmp_path / "y.jpg", "JPEG")], " dog ")
    assert skipped == []
    images, record = ws.reference_set(name)
    assert [p.name for p in images] == ["000.png", "001.png"] and [Image.open(p).format for p in images] == ["PNG", "PNG"]
    assert (record["class_word"], record["names"]) == ("dog", ["x.png", "y.jpg"])
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    with pytest.raises(ValueError):
        ws.save_references([str(bad)], "dog")
    with pytest.raises(ValueError, match="class word"):
        ws.save_references([photo(tmp_path / "ok.png")], "../../etc")
    assert ws.reference_sets() == [name] and len(list((ws.root / "references").iterdir())) == 1


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "..", "a/b.mp4", "", "x.mp4.json", None])
def test_client_names_never_become_paths(tmp_path, name):
    ws = Workspace(tmp_path / "w")
    with pytest.raises((ValueError, FileNotFoundError)):
        ws.video_path(name)
    with pytest.raises((ValueError, FileNotFoundError)):
        ws.identity_path(name)


def test_identity_import_checks_contents(tmp_path):
    ws = Workspace(tmp_path / "w")
    name = ws.import_identity(str(identity_file(tmp_path / "mine.safetensors", token="<imp>")))
    assert name.startswith("dog-") and name in dict((n, label) for label, n in ws.identities())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="'junk.safetensors': not a magicme identity"):
        ws.import_identity(str(junk))
    assert [p.name for p in (ws.root / "identities").iterdir()] == [name]


# ---- masks


def subject_photos(tmp_path, names):
    files = []
    for i, n in enumerate(names):
        im = Image.new("RGB", (96, 96), (40, 90, 40))
        im.paste((230, 200, 60), (28 + 4 * i, 24, 70 + 4 * i, 76))
        files.append(str(tmp_path / n))
        im.save(files[-1])
    return files


def test_user_masks_match_photos_by_name_and_drive_prepare(tmp_path):
    ws = Workspace(tmp_path / "w", device="cpu")
    name, _ = ws.save_references(subject_photos(tmp_path, ["rex.png", "fido.png"]), "dog")
    square = np.zeros((96, 96), np.uint8)
    square[10:50, 20:60] = 255
    up = tmp_path / "masks"
    up.mkdir()
    Image.fromarray(square).save(up / "rex_mask.png")
    rgba = np.zeros((96, 96, 4), np.uint8)
    rgba[30:90, 30:90] = (255, 255, 255, 255)  # transparency: the alpha is the mask
    Image.fromarray(rgba).save(up / "fido.png")
    with pytest.raises(ValueError, match="none for photo 'fido.png'"):
        ws.save_masks(name, [str(up / "rex_mask.png")])
    Image.fromarray(square).save(up / "spot.png")
    with pytest.raises(ValueError, match="mask 'spot.png' matches no photo"):
        ws.save_masks(name, [str(up / "rex_mask.png"), str(up / "fido.png"), str(up / "spot.png")])
    Image.fromarray(square[:50]).save(up / "rex.png")
    with pytest.raises(ValueError, match="mask 'rex.png' is 96x50 but its image is 96x96") as e:
        ws.save_masks(name, [str(up / "rex.png"), str(up / "fido.png")])
    assert str(tmp_path) not in str(e.value)
    (up / "fido.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"mask 'fido.png': not a readable image"):
        ws.save_masks(name, [str(up / "rex_mask.png"), str(up / "fido.png")])
    Image.fromarray(rgba).save(up / "fido.png")
    ws.save_masks(name, [str(up / "fido.png"), str(up / "rex_mask.png")])
    manifest = ws.prepare(name, user_masks=True)
    assert [it["mask_method"] for it in manifest["items"]] == ["user", "user"]
    assert manifest["items"][0]["mask_area"] == pytest.approx(40 * 40 / 96**2, abs=0.01)  # rex: the 40×40 square
    assert manifest["items"][1]["mask_area"] == pytest.approx(60 * 60 / 96**2, abs=0.01)


def test_a_painted_mask_replaces_one_prepared_mask(tmp_path):
    ws = Workspace(tmp_path / "w", device="cpu")
    name, _ = ws.save_references(subject_photos(tmp_path, ["a.png", "b.png"]), "dog")
    ws.prepare(name, "grabcut")
    folder = ws.prepared(name)
    sheet = (folder / "contact_sheet.png").read_bytes()
    other = sorted((folder / "masks").iterdir())[0].read_bytes()
    side = Image.open(sorted((folder / "images").iterdir())[1]).size[0]  # the prepared square (prepare's resolution)
    painted = np.zeros((side, side), bool)
    painted[0:20, 0:30] = True
    manifest = ws.set_mask(name, 1, painted)
    item = manifest["items"][1]
    assert (item["mask_method"], item["mask_area"]) == ("user", pytest.approx(600 / side**2))
    assert np.array_equal(np.asarray(Image.open(folder / item["mask"])) > 127, painted)
    half = ws.set_mask(name, 1, painted[::2, ::2])  # an editor canvas of another size is scaled to the photo
    assert half["items"][1]["mask_area"] == pytest.approx(600 / side**2, rel=0.05)
    assert json.loads((folder / "manifest.json").read_text())["items"][1]["mask_method"] == "user"
    assert (folder / "contact_sheet.png").read_bytes() != sheet
    assert sorted((folder / "masks").iterdir())[0].read_bytes() == other
    with pytest.raises(ValueError, match="empty"):
        ws.set_mask(name, 0, np.zeros((side, side), bool))
    with pytest.raises(ValueError, match="pick one of the 2 masks"):
        ws.set_mask(name, 5, painted)


def test_clip_names_say_what_they_show_and_stay_valid_names():
    from magicme.workspace import _NAME, video_name

    assert video_name("a <v*> dog running!", 3).startswith("a-v-dog-running-s3-")
    longest = video_name("upscale " + "word " * 40, 2**63 - 1)
    assert _NAME.match(longest) and longest.endswith(".mp4")
    assert video_name("<v*>", 0).startswith("v-s0-") and video_name("<>", 0).startswith("clip-s0-")
