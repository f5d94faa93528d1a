"""The identity set (paper §4.2, §5.2): reference images squared around the subject, one mask each.

`prepare_identity_set` turns a folder of 1–N photos into a prepared folder:

    images/000_<stem>.png   RGB, resolution × resolution, squared around the subject
    masks/000_<stem>.png    L, white on the subject (prompt-to-segmentation, GrabCut or the user's)
    manifest.json           class word, resolution, and per image: source, crop box, how its mask was made
    contact_sheet.png       image | mask overlay, one row per image, for a person to check the masks

For people (a class word such as 'woman') the faces are checked first (`check_faces`): a photo with no
face or several is named, and so is one whose face is far from the others' (someone else in the set).

`augment` is the training-time augmentation (Custom Diffusion's recipe, used by the reference code):
image and mask are rescaled, flipped and rotated together, and the prompt says how far the subject is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .outputs import atomic_folder, check_output
from .faces import is_person
from .segment import Segmentation, Segmenter, SegmenterConfig, read_user_mask
from .video import open_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "magicme.identity-set/1"
CONTENTS = {"images", "masks", MANIFEST, "contact_sheet.png"}  # everything a prepared folder holds
MIN_SIDE = 16  # pixels: a smaller photo holds no subject to learn (and GrabCut needs some background)
CANVAS_GREY = 127  # the empty canvas of a shrunk sample: mid-grey, 0 after [-1, 1] scaling


@dataclass
class PrepareConfig:
    """One `magicme prepare` request."""

    images: str | Path
    class_word: str
    out: str | Path = "prepared"
    masks: str | Path | None = None  # a folder of user masks, one per image with the same stem
    resolution: int = 512  # §5.2: SD-1.5's training resolution
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)

    def check(self) -> None:
        """Validate every argument before any work; the output must be new or a folder `prepare` wrote."""
        images = Path(self.images)
        if not images.is_dir():
            raise FileNotFoundError(f"--images {str(images)!r} is not a folder")
        if not isinstance(self.class_word, str) or not self.class_word.strip():
            raise ValueError("--class-word must be a non-empty word such as 'dog' or 'woman'")
        if not isinstance(self.resolution, int) or isinstance(self.resolution, bool) or not 8 <= self.resolution <= 4096 or self.resolution % 8:
            raise ValueError(f"--resolution must be a multiple of 8 in [8, 4096], got {self.resolution!r}")
        if self.masks is not None and not Path(self.masks).is_dir():
            raise FileNotFoundError(f"--masks {str(self.masks)!r} is not a folder")
        inputs = [("--images", images)] + ([("--masks", self.masks)] if self.masks is not None else [])
        check_output(self.out, folder=True, owned=is_prepared_folder, inputs=inputs, record=False)
        self.segmenter.check()


def load_side(resolution: int) -> int:
    """Photos are downscaled on load to this long side: 4× the output's, at least 2048 (the crop is the short side)."""
    return max(2048, 4 * resolution)


def load_image(path: str | Path, max_side: int | None = None, min_side: int = 1, what: str = "--images: photo"):
    """An image file as an upright RGB PIL image: EXIF orientation applied, alpha composited on white.

    Decoded by `open_image` (bombs and images under `min_side` refused, ValueError); downscaled to
    `max_side` if larger.
    """
    from PIL import Image

    im = open_image(path, what, max_side=max_side, min_side=min_side)
    source = im.info["source_size"]
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        im = im.convert("RGB")
    im.info["source_size"] = source
    return im


def load_reference_images(folder: str | Path, max_side: int | None = None) -> list[tuple[Path, object]]:
    """Every readable jpg/png/webp in `folder` (sorted by name) as (path, RGB image), downscaled to `max_side`.

    Other files, unreadable or tiny images are skipped with a warning naming them; none left is an error.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"--images {str(folder)!r} is empty; put 1 or more photos of the subject in it")
    out, skipped = [], []
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(f"{str(p)!r} is not a jpg/png/webp image")
            continue
        try:
            out.append((p, load_image(p, max_side, MIN_SIDE)))
        except ValueError as e:
            skipped.append(str(e))
    if not out:  # one line: the first reason stands for all
        raise ValueError(f"--images {str(folder)!r} holds no readable jpg/png/webp photo ({skipped[0]}"
                         + (f"; and {len(skipped) - 1} more" if len(skipped) > 1 else "") + ")")
    for reason in skipped:
        log.warning("--images: skipping: %s", reason)
    stems = [p.stem for p, _ in out]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"--images: several files share the stem {dup[0]!r}; masks are matched by stem, rename one")
    return out


def square_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """A square (x0, y0, x1, y1) around the subject: the image's short side when the subject fits, else padded.

    The square is centred on the subject's bounding box and kept inside the image where it can be;
    a subject wider than the short side gets a larger square that reaches past the image (padding).
    """
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        bx0, by0, bx1, by1 = 0, 0, w, h
    else:
        bx0, by0, bx1, by1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    side = max(min(w, h), bx1 - bx0, by1 - by0)
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2

    def place(centre: float, extent: int) -> int:
        start = int(round(centre - side / 2))
        # fits: slide it inside the image; too large: keep the subject centred and pad
        return min(max(start, 0), extent - side) if side <= extent else start

    x0, y0 = place(cx, w), place(cy, h)
    return x0, y0, x0 + side, y0 + side


def crop_square(image, mask: np.ndarray, box: tuple[int, int, int, int], resolution: int):
    """Crop (padding with the image's edge colour where the box leaves it) and resize; mask padded with 0."""
    from PIL import Image

    rgb = np.asarray(image)
    h, w = mask.shape
    x0, y0, x1, y1 = box
    pad = (max(0, -y0), max(0, y1 - h)), (max(0, -x0), max(0, x1 - w))
    if any(v for pair in pad for v in pair):
        rgb = np.pad(rgb, (*pad, (0, 0)), mode="edge")
        mask = np.pad(mask, pad, mode="constant")
        x0, x1, y0, y1 = x0 + pad[1][0], x1 + pad[1][0], y0 + pad[0][0], y1 + pad[0][0]
    img = Image.fromarray(rgb[y0:y1, x0:x1]).resize((resolution, resolution), Image.LANCZOS)
    m = Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8) * 255).resize((resolution, resolution), Image.BILINEAR)
    return img, np.asarray(m) > 127


def contact_sheet(images: list, masks: list[np.ndarray], thumb: int = 256):
    """One row per image: the image, then the image with the mask tinted red and the background dimmed."""
    from PIL import Image

    rows = []
    for img, mask in zip(images, masks):
        a = np.asarray(img.convert("RGB").resize((thumb, thumb), Image.LANCZOS)).astype(np.float32)
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((thumb, thumb), Image.NEAREST)) > 127
        overlay = a * 0.35
        overlay[m] = a[m] * 0.5 + np.array([255.0, 0.0, 0.0]) * 0.5
        rows.append(np.concatenate([a, np.full((thumb, 4, 3), 255.0), overlay], axis=1))
    gap = np.full((4, rows[0].shape[1], 3), 255.0)
    sheet = np.concatenate([x for r in rows for x in (r, gap)][:-1], axis=0)
    return Image.fromarray(sheet.round().astype(np.uint8))


def _user_mask_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + (".bmp",):
            files.setdefault(p.stem, p)
    return files


def check_faces(refs: list[tuple[Path, object]]) -> list[dict] | None:
    """The faces in photos of one person: per photo its faces, the largest one, and that face's median dlib
    distance to the other photos' faces (the same person is below 0.6).

    Warns, one line per photo, of no face, of several faces (the largest is the subject), and of a face
    farther than 0.6 from the others (a photo of someone else?). None, with one line saying what is
    missing, without the `[faces]` extra.
    """
    from .faces import SAME_PERSON_DISTANCE, FaceFinder, distance_to_others, largest, missing_packages

    missing = missing_packages()
    if missing:
        log.warning("face check skipped: %s", missing)
        return None
    finder = FaceFinder("hog", max_side=2048, descriptors=True)
    out = []
    for path, img in refs:
        rgb = np.asarray(img)
        found = finder(rgb)
        face = largest(found)
        if not found:
            log.warning("--images: no face found in %r", str(path))
        elif len(found) > 1:
            log.warning("--images: %d faces in %r; the largest is taken as the subject", len(found), str(path))
        out.append({"faces": found, "face": face, "descriptor": finder.descriptor(rgb, face) if face else None})
    for (path, _), item, d in zip(refs, out, distance_to_others([o["descriptor"] for o in out])):
        item["distance"] = d
        if d is not None and d > SAME_PERSON_DISTANCE:
            log.warning("--images: the face in %r is %.2f from the other photos' faces (the same person is below %.1f): "
                        "a photo of someone else?", str(path), d, SAME_PERSON_DISTANCE)
    return out


def prepare_identity_set(cfg: PrepareConfig, segmenter: Segmenter | None = None, *, quiet: bool = False) -> Path:
    """Write the prepared identity set (see the module docstring) atomically into `cfg.out`; return it."""
    from PIL import Image

    from .progress import progress_bar

    cfg.check()
    refs = load_reference_images(cfg.images, load_side(cfg.resolution))
    class_word = cfg.class_word.strip()
    faces = check_faces(refs) if is_person(class_word) else None
    user_masks = None
    if cfg.masks is not None:
        user_masks = _user_mask_files(Path(cfg.masks))
        missing = [p.name for p, _ in refs if p.stem not in user_masks]
        if missing:
            raise ValueError(f"--masks {str(cfg.masks)!r} has no mask for {missing[0]!r} (expected one with the stem {Path(missing[0]).stem!r})")
        segs = [
            Segmentation(read_user_mask(user_masks[p.stem], img.info["source_size"], img.size), "user", note=user_masks[p.stem].name)
            for p, img in refs
        ]
        status = f"user masks from {cfg.masks}"
    else:
        segmenter = segmenter or Segmenter(cfg.segmenter)
        segs = []
        with progress_bar(len(refs), "prepare: subject masks", quiet=quiet, unit="photo") as bar:
            for i, (path, img) in enumerate(refs):
                bar.set_postfix_str(path.name)
                segs.append(segmenter(img, class_word, faces=faces[i]["faces"] if faces else None))
                bar.update(1)
        status = segmenter.status

    out = Path(cfg.out)
    with atomic_folder(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        items, prepared, prepared_masks = [], [], []
        for i, ((path, img), seg) in enumerate(zip(refs, segs)):
            box = square_box(seg.mask)
            sq, sq_mask = crop_square(img, seg.mask, box, cfg.resolution)
            name = f"{i:03d}_{path.stem}.png"
            sq.save(tmp / "images" / name)
            Image.fromarray(sq_mask.astype(np.uint8) * 255).save(tmp / "masks" / name)
            prepared.append(sq)
            prepared_masks.append(sq_mask)
            items.append(
                {
                    "image": f"images/{name}",
                    "mask": f"masks/{name}",
                    "source": str(path.resolve()),
                    "source_size": list(img.info["source_size"]),
                    "working_size": list(img.size),  # the photo as segmented and cropped (huge ones downscaled)
                    "crop_box": list(box),
                    "mask_method": seg.method,
                    "mask_box": list(seg.box) if seg.box else None,
                    "mask_score": seg.score,
                    "mask_area": float(sq_mask.mean()),
                    "note": seg.note,
                }
            )
            if faces:
                face = faces[i]["face"]
                items[-1].update(faces=len(faces[i]["faces"]), face_box=[round(v, 1) for v in face.box] if face else None,
                                 face_distance=None if faces[i]["distance"] is None else round(faces[i]["distance"], 3))
        contact_sheet(prepared, prepared_masks).save(tmp / "contact_sheet.png")
        manifest = {
            "format": MANIFEST_FORMAT,
            "class_word": class_word,
            "resolution": cfg.resolution,
            "segmentation": status,
            "segmenter": asdict(cfg.segmenter),
            "items": items,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def is_prepared_folder(folder: Path) -> bool:
    """A folder `prepare` wrote and nobody added to: a valid manifest, and nothing but what it lists."""
    try:
        manifest = read_manifest(folder)
    except (FileNotFoundError, ValueError):
        return False
    listed = {item[k] for item in manifest["items"] for k in ("image", "mask")}
    for p in folder.iterdir():
        if p.name not in CONTENTS:
            return False
        if p.is_dir() and any(f"{p.name}/{q.name}" not in listed for q in p.iterdir()):
            return False
    return True


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a prepared folder, checked; FileNotFoundError/ValueError name the folder and the fault."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(folder)!r} is not a prepared folder (no {MANIFEST}); run 'magicme prepare' first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--data: {str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not manifest.get("items"):
        raise ValueError(f"--data: {str(path)!r} is not a magicme identity-set manifest or lists no images")
    if not isinstance(manifest.get("class_word"), str) or not isinstance(manifest["items"], list):
        raise ValueError(f"--data: {str(path)!r} is malformed (class_word must be a string, items a list)")
    for n, item in enumerate(manifest["items"], 1):
        for key, sub in (("image", "images"), ("mask", "masks")):
            value = item.get(key) if isinstance(item, dict) else None
            # a listed file must be a plain name inside the folder's own images/ or masks/
            if not isinstance(value, str) or Path(value).parent != Path(sub) or Path(value).name in ("", ".", ".."):
                raise ValueError(f"--data: {str(path)!r} item {n}: {key!r} must be a file in {sub}/, got {value!r}")
    return manifest


def load_identity_set(folder: str | Path, resolution: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Prepared images (N, R, R, 3) uint8 and masks (N, R, R) bool at `resolution`, and the manifest."""
    from PIL import Image

    folder = Path(folder)
    manifest = read_manifest(folder)
    images, masks = [], []
    for item in manifest["items"]:
        ip, mp = folder / item["image"], folder / item["mask"]
        for p in (ip, mp):
            if not p.is_file():
                raise FileNotFoundError(f"--data: {str(p)!r} listed in the manifest is missing")
        img = open_image(ip, "--data: image", max_side=4096).convert("RGB")
        mask = open_image(mp, "--data: mask", max_side=4096).convert("L")
        if mask.size != img.size:
            raise ValueError(f"--data: mask {str(mp)!r} is {mask.size} but its image is {img.size}")
        if img.size != (resolution, resolution):
            img = img.resize((resolution, resolution), Image.LANCZOS)
            mask = mask.resize((resolution, resolution), Image.BILINEAR)
        images.append(np.asarray(img))
        masks.append(np.asarray(mask) > 127)
    return np.stack(images), np.stack(masks), manifest


# ---- training-time augmentation (Custom Diffusion's recipe, as the reference implementation uses) ----

@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation applied to image and mask together; defaults from the reference implementation."""

    flip: float = 0.5  # probability of a horizontal flip
    max_rotation: float = 10.0  # degrees, uniform in ±max_rotation
    shrink_share: float = 2 / 3  # share of samples rescaled to [1/3, 1]×, the rest zoomed to [1.2, 1.4]×
    min_scale: float = 1 / 3
    zoom: tuple[float, float] = (1.2, 1.4)


FAR_WORDS = ("a far away", "very small")
CLOSE_WORDS = ("zoomed in", "close up")


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()):
    """One augmented sample: (image (R, R, 3) uint8, subject mask (R, R) bool, valid (R, R) bool, prompt words).

    `valid` marks pixels that show the photo (not the empty canvas or rotation corners); the words
    ("very small", "close up", or "") describe the rescale so the prompt stays true to the picture.
    """
    from PIL import Image

    r = image.shape[0]
    img = Image.fromarray(image)
    msk = Image.fromarray(mask.astype(np.uint8) * 255)
    val = Image.fromarray(np.full(mask.shape, 255, np.uint8))
    if rng.random() < cfg.flip:
        img, msk = img.transpose(Image.FLIP_LEFT_RIGHT), msk.transpose(Image.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation)) if cfg.max_rotation > 0 else 0.0
    if angle:
        img = img.rotate(angle, Image.BILINEAR, fillcolor=(CANVAS_GREY,) * 3)
        msk = msk.rotate(angle, Image.BILINEAR, fillcolor=0)
        val = val.rotate(angle, Image.BILINEAR, fillcolor=0)
    words = ""
    if rng.random() < cfg.shrink_share:
        side = int(rng.integers(max(1, round(r * cfg.min_scale)), r + 1))
        if side < 0.6 * r:  # the reference adds the words only when the subject became clearly small
            words = FAR_WORDS[int(rng.integers(len(FAR_WORDS)))]
        x0, y0 = (int(rng.integers(0, r - side + 1)) for _ in range(2))
        canvas = (Image.new("RGB", (r, r), (CANVAS_GREY,) * 3), Image.new("L", (r, r), 0), Image.new("L", (r, r), 0))
        for c, part, resample in zip(canvas, (img, msk, val), (Image.LANCZOS, Image.BILINEAR, Image.BILINEAR)):
            c.paste(part.resize((side, side), resample), (x0, y0))
        img, msk, val = canvas
    else:
        side = int(round(r * rng.uniform(*cfg.zoom)))
        words = CLOSE_WORDS[int(rng.integers(len(CLOSE_WORDS)))]
        x0, y0 = (int(rng.integers(0, side - r + 1)) for _ in range(2))
        box = (x0, y0, x0 + r, y0 + r)
        img = img.resize((side, side), Image.LANCZOS).crop(box)
        msk = msk.resize((side, side), Image.BILINEAR).crop(box)
        val = val.resize((side, side), Image.BILINEAR).crop(box)
    return np.asarray(img), np.asarray(msk) > 127, np.asarray(val) > 127, words
