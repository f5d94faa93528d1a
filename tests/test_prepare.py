import json
import logging

import numpy as np
import pytest
from PIL import Image

from magicme.cli import main
from magicme.prepare import (
    CLOSE_WORDS,
    FAR_WORDS,
    AugmentConfig,
    PrepareConfig,
    augment,
    load_identity_set,
    load_image,
    load_reference_images,
    prepare_identity_set,
    square_box,
)
from magicme.segment import SegmenterConfig

GRABCUT = SegmenterConfig(method="grabcut")
ORANGE = np.array([230, 90, 30])


def write_subject(path, h=90, w=120, cx=0.5, seed=0):
    """An orange ellipse on a flat background; returns its true mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = ((xx - w * cx) / (w * 0.15)) ** 2 + ((yy - h * 0.5) / (h * 0.3)) ** 2 < 1
    img = np.where(mask[..., None], ORANGE, rng.uniform(30, 120, 3)) + rng.normal(0, 4, (h, w, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return mask


def orange(img):
    return np.abs(np.asarray(img, np.float32) - ORANGE).sum(-1) < 60


def test_load_image_honours_exif_orientation_and_converts_modes(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    up = np.asarray(load_image(tmp_path / "rot.jpg"))
    assert up.shape == (40, 20, 3) and up[:20].mean() > 200 and up[20:].mean() < 50  # white half now on top
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert out.shape == (4, 4, 3) and (out[:2] == [200, 0, 0]).all() and (out[2:] == 255).all()  # on white
    Image.fromarray(np.full((5, 6), 77, np.uint8)).save(tmp_path / "g.webp", lossless=True)
    g = np.asarray(load_image(tmp_path / "g.webp"))
    assert g.shape == (5, 6, 3) and (g == 77).all()


def test_reference_images_skip_bad_files_with_a_warning(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="--images"):
        load_reference_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="empty"):
        load_reference_images(tmp_path)
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n garbage")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="no readable"):
        load_reference_images(tmp_path)
    write_subject(tmp_path / "dog.png")
    with caplog.at_level(logging.WARNING):
        refs = load_reference_images(tmp_path)
    assert [p.name for p, _ in refs] == ["dog.png"]
    for name in ("zero.jpg", "broken.png", "notes.txt"):
        assert name in caplog.text


def test_square_box_fits_or_pads_around_the_subject():
    m = np.zeros((100, 200), bool)
    m[30:60, 120:150] = True
    assert square_box(m) == (85, 0, 185, 100)  # the short side, centred on the subject
    m[30:60, 120:190] = True
    assert square_box(m) == (100, 0, 200, 100)  # slid back inside the image
    wide = np.zeros((100, 200), bool)
    wide[40:60, 10:170] = True
    x0, y0, x1, y1 = square_box(wide)
    assert x1 - x0 == y1 - y0 == 160 and x0 <= 10 and x1 >= 170 and y0 < 0 and y1 > 100  # padded


def test_prepare_writes_squares_masks_manifest_and_contact_sheet(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, cx in enumerate((0.3, 0.5, 0.7)):
        write_subject(src / f"p{i}.png", cx=cx, seed=i)
    out = prepare_identity_set(PrepareConfig(images=src, class_word="toy", out=tmp_path / "prep", resolution=64, segmenter=GRABCUT))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_word"] == "toy" and manifest["resolution"] == 64 and len(manifest["items"]) == 3
    images, masks, _ = load_identity_set(out, 64)
    assert images.shape == (3, 64, 64, 3) and masks.shape == (3, 64, 64)
    for img, mask, item in zip(images, masks, manifest["items"]):
        truth = orange(img)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.85  # the mask is the subject
        assert item["mask_method"] == "grabcut-center" and 0 < item["mask_area"] < 0.6
        assert truth.sum() > 300 and not (truth[:, 0].any() or truth[:, -1].any())  # the crop keeps the whole subject
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (2 * 256 + 4, 3 * 256 + 2 * 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a second run replaces a prepared folder; a foreign folder is refused
    prepare_identity_set(PrepareConfig(images=src, class_word="toy", out=out, resolution=64, segmenter=GRABCUT))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--out"):
        prepare_identity_set(PrepareConfig(images=src, class_word="toy", out=tmp_path / "other", segmenter=GRABCUT))


def test_user_masks_by_stem_and_bad_masks_write_nothing(tmp_path):
    src, masks = tmp_path / "photos", tmp_path / "masks"
    src.mkdir()
    masks.mkdir()
    truth = write_subject(src / "a.jpg")
    Image.fromarray(truth.astype(np.uint8) * 255).save(masks / "a.png")
    out = prepare_identity_set(PrepareConfig(images=src, class_word="dog", out=tmp_path / "prep", masks=masks, resolution=64))
    item = json.loads((out / "manifest.json").read_text())["items"][0]
    assert item["mask_method"] == "user"
    _, m, _ = load_identity_set(out, 64)
    assert m[0].mean() == pytest.approx(truth.sum() / 90**2, abs=0.03)  # the user's mask, cropped to 90×90
    Image.fromarray(np.ones((10, 10), np.uint8) * 255).save(masks / "a.png")
    with pytest.raises(ValueError, match=r"a\.png.*10x10"):
        prepare_identity_set(PrepareConfig(images=src, class_word="dog", out=tmp_path / "p2", masks=masks))
    (masks / "a.png").unlink()
    with pytest.raises(ValueError, match="no mask for 'a.jpg'"):
        prepare_identity_set(PrepareConfig(images=src, class_word="dog", out=tmp_path / "p2", masks=masks))
    assert not (tmp_path / "p2").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_augment_moves_image_and_mask_together():
    r = 64
    yy, xx = np.mgrid[:r, :r]
    mask = ((xx - 32) / 14) ** 2 + ((yy - 30) / 20) ** 2 < 1
    img = np.where(mask[..., None], ORANGE, [20, 60, 200]).astype(np.uint8)
    seen = set()
    for seed in range(40):
        a_img, a_mask, valid, words = augment(img, mask, np.random.default_rng(seed))
        seen.add(words)
        truth = orange(a_img)
        if a_mask.sum() > 20:
            assert (a_mask & truth).sum() / (a_mask | truth).sum() > 0.8
        if words in FAR_WORDS:
            assert valid.mean() < 0.6**2  # shrunk onto an empty canvas
        if words in CLOSE_WORDS:
            assert valid.mean() > 0.9  # zoomed: the photo fills the frame but its rotated corners
        assert not (a_mask & ~valid).any()
        again = augment(img, mask, np.random.default_rng(seed))
        assert np.array_equal(again[0], a_img) and again[3] == words  # seeded
    assert seen & set(FAR_WORDS) and seen & set(CLOSE_WORDS) and "" in seen
    plain, pm, pv, w = augment(img, mask, np.random.default_rng(0), AugmentConfig(flip=0, max_rotation=0, shrink_share=0, zoom=(1.0, 1.0)))
    assert np.array_equal(plain, img) and np.array_equal(pm, mask) and pv.all()


def test_prepare_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    write_subject(tmp_path / "photos" / "x.png")
    (tmp_path / "photos" / "readme.txt").write_text("skip me")
    code = main(["prepare", "--images", "photos", "--class-word", "toy", "--segmenter", "grabcut", "--resolution", "64"])
    out = capsys.readouterr()
    assert code == 0 and "contact_sheet.png" in out.out and "grabcut" in out.out
    assert (tmp_path / "prepared" / "manifest.json").is_file()
    for args, needle in (
        (["--images", "nope", "--class-word", "toy"], "--images"),
        (["--images", "photos", "--class-word", " "], "--class-word"),
        (["--images", "photos", "--class-word", "toy", "--resolution", "100"], "--resolution"),
        (["--images", "photos", "--class-word", "toy", "--out", "no/dir"], "--out"),
    ):
        code = main(["prepare", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0]
