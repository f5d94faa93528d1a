"""Prompt-to-segmentation (paper §4.2): a mask of the subject from its class word.

The paper's method: class word → Grounding DINO boxes → the best box → SAM mask. We run both with
transformers (`GroundingDinoForObjectDetection`, `SamModel`); the ids are configurable. When those
weights cannot be had (offline, no cache), an OpenCV GrabCut fallback needs no segmentation weights: for
people it is seeded from the detected face and its landmarks (dlib, the `[faces]` extra; OpenCV's Haar
cascade without it), with the head and body box around them; otherwise from a central box.
Masks are (H, W) bool arrays, True on the subject.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .faces import is_person

log = logging.getLogger(__name__)

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SAM = "facebook/sam-vit-base"
SEGMENTERS = ("auto", "grounded-sam", "grabcut")


@dataclass(frozen=True)
class SegmenterConfig:
    """How subject masks are made."""

    method: str = "auto"  # auto: Grounding DINO + SAM when loadable, else GrabCut (said so)
    detector: str = DEFAULT_DETECTOR
    sam: str = DEFAULT_SAM
    box_threshold: float = 0.25  # Grounding DINO's usual box/text score threshold
    mask_threshold: float = 0.0  # on SAM's mask logits
    max_hole_fraction: float = 0.01  # holes smaller than this share of the image are filled
    device: str | None = None

    def check(self) -> None:
        if self.method not in SEGMENTERS:
            raise ValueError(f"--segmenter must be one of {', '.join(SEGMENTERS)}, got {self.method!r}")
        if not 0.0 <= self.box_threshold < 1.0:
            raise ValueError(f"--box-threshold must be in [0, 1), got {self.box_threshold!r}")
        if not 0.0 <= self.max_hole_fraction < 1.0:
            raise ValueError(f"max_hole_fraction must be in [0, 1), got {self.max_hole_fraction!r}")


@dataclass(frozen=True)
class Segmentation:
    """One image's subject mask and how it was made (`method` goes into the manifest)."""

    mask: np.ndarray  # (H, W) bool
    method: str  # grounded-sam | grabcut-face | grabcut-center | user
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in pixels
    score: float | None = None
    note: str = ""


def fill_small_holes(mask: np.ndarray, max_fraction: float) -> np.ndarray:
    """Fill background regions enclosed by the mask (not touching the border) smaller than max_fraction of the image."""
    import cv2

    mask = np.asarray(mask, bool)
    h, w = mask.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    out = mask.copy()
    limit = max_fraction * h * w
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        touches_border = x == 0 or y == 0 or x + bw == w or y + bh == h
        if not touches_border and area <= limit:
            out[labels == i] = True
    return out


def box_to_body(face: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """Grow a face box (x0, y0, x1, y1) to a box around the whole person, clipped to the image.

    A standing adult is about 7–8 heads tall and 3 heads wide at the shoulders.
    """
    x0, y0, x1, y1 = face
    fw, fh = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    box = (cx - 1.75 * fw, y0 - 0.5 * fh, cx + 1.75 * fw, y0 + 7.5 * fh)
    bx0, by0 = max(0, int(round(box[0]))), max(0, int(round(box[1])))
    bx1, by1 = min(width, int(round(box[2]))), min(height, int(round(box[3])))
    return bx0, by0, bx1, by1


def central_box(width: int, height: int, margin: float = 0.1) -> tuple[int, int, int, int]:
    """The centre of the image with `margin` of each side left out (GrabCut needs some sure background)."""
    mx, my = max(1, int(round(width * margin))), max(1, int(round(height * margin)))
    return mx, my, width - mx, height - my


def haar_face_detector():
    """OpenCV's bundled frontal-face Haar cascade as `detect(rgb) -> [(x0, y0, x1, y1)]`, or None.

    opencv-python 4.x ships the cascade files; OpenCV 5 dropped `CascadeClassifier` from the main
    module, and then there is no weight-free face detector to use.
    """
    import cv2

    if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
        return None
    path = Path(getattr(cv2.data, "haarcascades", "")) / "haarcascade_frontalface_default.xml"
    if not path.is_file():
        return None
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        return None

    def detect(image: np.ndarray) -> list[tuple[int, int, int, int]]:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        side = min(grey.shape)
        faces = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(max(16, side // 20),) * 2)
        return [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in faces]

    return detect


def bundled_face_detector():
    """The GrabCut fallback's face detector: dlib's HOG with landmark boxes (the `[faces]` extra), else
    OpenCV's Haar cascade, else None."""
    from .faces import FaceFinder, missing_packages

    return haar_face_detector() if missing_packages() else FaceFinder("hog", max_side=2048)


def face_seed(face, width: int, height: int) -> np.ndarray:
    """GrabCut's starting labels for a person, from the face box and its landmarks.

    Sure background outside `box_to_body`; inside it, probable foreground on a head box (the face grown
    for hair) and a body box (below the chin, shoulders 3.5 faces wide), probable background beside the
    head; sure foreground on the face around its landmarks (eyes and nose).
    """
    import cv2

    fx0, fy0, fx1, fy1 = face.box
    side = face.side
    labels = np.full((height, width), cv2.GC_BGD, np.uint8)
    x0, y0, x1, y1 = box_to_body(tuple(int(round(v)) for v in face.box), width, height)
    labels[y0:y1, x0:x1] = cv2.GC_PR_BGD
    head = (fx0 - 0.2 * side, fy0 - 0.5 * side, fx1 + 0.2 * side, fy1 + 0.2 * side)
    cx = (fx0 + fx1) / 2
    body = (cx - 1.75 * side, fy1 + 0.2 * side, cx + 1.75 * side, height)
    for bx0, by0, bx1, by1 in (head, body):
        bx0, by0 = max(x0, int(round(bx0))), max(y0, int(round(by0)))
        labels[by0 : min(y1, int(round(by1))), bx0 : min(x1, int(round(bx1)))] = cv2.GC_PR_FGD
    pts = np.asarray(face.landmarks)
    centre = (int(round(pts[:, 0].mean())), int(round((pts[:, 1].mean() + pts[4, 1]) / 2)))  # around the nose
    axes = (max(1, int(round(0.25 * side))), max(1, int(round(0.3 * side))))
    cv2.ellipse(labels, centre, axes, 0, 0, 360, int(cv2.GC_FGD), -1)
    return labels


def grabcut_mask(image: np.ndarray, class_word: str, face_detector="bundled", iterations: int = 5, faces=None) -> Segmentation:
    """The weight-free fallback: GrabCut seeded from the face for people, or from a central box.

    `image` is (H, W, 3) uint8 RGB. `face_detector` is a callable `rgb -> [faces]` (`faces.Face`s or
    (x0, y0, x1, y1) boxes), None (no face search), or "bundled" (`bundled_face_detector`); `faces`,
    when given, are the faces already found in the image. The largest face is the person: with its
    landmarks (dlib) GrabCut starts from `face_seed`, else from the face box grown to the body.
    """
    import cv2

    h, w = image.shape[:2]
    if min(h, w) < 3:  # OpenCV asserts: GrabCut needs background pixels on every side of its box
        raise ValueError(f"an image of {w}×{h} pixels is too small for GrabCut (at least 3×3)")
    person = is_person(class_word)
    if face_detector == "bundled":
        face_detector = bundled_face_detector() if person and faces is None else None
    method, note = "grabcut-center", ""
    box, seed = central_box(w, h), None
    if person:
        if faces is None:
            faces = face_detector(image) if face_detector is not None else []
        if faces:
            face = max(faces, key=lambda f: _area(getattr(f, "box", f)))
            box = box_to_body(tuple(int(round(v)) for v in getattr(face, "box", face)), w, h)
            method = "grabcut-face"
            if getattr(face, "landmarks", None) is not None:
                seed = face_seed(face, w, h)
        else:
            note = "no face found" if face_detector is not None or faces is not None else "no face detector in this OpenCV build"
    x0, y0, x1, y1 = box
    if x1 - x0 < 2 or y1 - y0 < 2 or (x0, y0, x1, y1) == (0, 0, w, h):
        box = x0, y0, x1, y1 = central_box(w, h)  # GrabCut needs some background outside the box
        if seed is not None:
            seed[:, :x0], seed[:, x1:], seed[:y0], seed[y1:] = cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD, cv2.GC_BGD
    gc = np.zeros((h, w), np.uint8) if seed is None else seed
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut's GMM initialisation is random; masks must be reproducible
    mode = cv2.GC_INIT_WITH_RECT if seed is None else cv2.GC_INIT_WITH_MASK
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), gc, (x0, y0, x1 - x0, y1 - y0), bgd, fgd, iterations, mode)
    mask = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    if not mask.any():
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = True
        note = (note + "; " if note else "") + "GrabCut found nothing, using the box"
    return Segmentation(fill_small_holes(mask, 0.01), method, box=(x0, y0, x1, y1), note=note)


def _area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


class GroundedSam:
    """Grounding DINO (open-vocabulary boxes from a class word) followed by SAM (a mask inside the box)."""

    def __init__(self, detector, detector_processor, sam, sam_processor, cfg: SegmenterConfig):
        self.detector, self.detector_processor = detector, detector_processor
        self.sam, self.sam_processor = sam, sam_processor
        self.cfg = cfg

    @classmethod
    def load(cls, cfg: SegmenterConfig = SegmenterConfig()) -> "GroundedSam":
        """Load both models from hub ids or local folders; raise FileNotFoundError naming the one that failed."""
        import torch
        from transformers import AutoProcessor, GroundingDinoForObjectDetection, SamModel, SamProcessor

        from .models import pick_device

        device = pick_device(cfg.device)
        loaded = []
        for what, name, model_cls, proc_cls in (
            ("--detector", cfg.detector, GroundingDinoForObjectDetection, AutoProcessor),
            ("--sam", cfg.sam, SamModel, SamProcessor),
        ):
            try:
                model = model_cls.from_pretrained(name).to(device).eval()
                proc = proc_cls.from_pretrained(name)
            except (OSError, ValueError) as e:  # hub/offline errors subclass OSError
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise FileNotFoundError(f"{what} {name!r} could not be loaded ({first})") from None
            loaded += [model, proc]
        return cls(*loaded, cfg=cfg)

    def best_box(self, image, class_word: str) -> tuple[tuple[float, float, float, float], float] | None:
        """The highest-scoring box for the class word, (x0, y0, x1, y1) in pixels, and its score; None if none passes."""
        import torch

        device = self.detector.device
        text = f"{class_word.strip().lower()}."  # Grounding DINO's prompt form: phrases ending in '.'
        inputs = self.detector_processor(images=image, text=text, return_tensors="pt").to(device)
        with torch.no_grad():
            out = self.detector(**inputs)
        res = self.detector_processor.post_process_grounded_object_detection(
            out,
            inputs["input_ids"],
            threshold=self.cfg.box_threshold,
            text_threshold=self.cfg.box_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        if len(res["scores"]) == 0:
            return None
        i = int(torch.argmax(res["scores"]))
        return tuple(float(v) for v in res["boxes"][i].tolist()), float(res["scores"][i])

    def mask_in_box(self, image, box: tuple[float, float, float, float]) -> np.ndarray:
        """SAM's single-mask output for the box prompt, at the image's size, thresholded on its logits."""
        import torch

        inputs = self.sam_processor(image, input_boxes=[[list(box)]], return_tensors="pt").to(self.sam.device)
        with torch.no_grad():
            out = self.sam(**inputs, multimask_output=False)
        logits = self.sam_processor.image_processor.post_process_masks(
            out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu(), binarize=False
        )[0]
        return (logits[0, 0] > self.cfg.mask_threshold).numpy()

    def __call__(self, image, class_word: str) -> Segmentation | None:
        """Segment the class word's subject in a PIL RGB image; None if the detector finds no box for it."""
        found = self.best_box(image, class_word)
        if found is None:
            return None
        box, score = found
        mask = fill_small_holes(self.mask_in_box(image, box), self.cfg.max_hole_fraction)
        ibox = tuple(int(round(v)) for v in box)
        if not mask.any():
            return None
        return Segmentation(mask, "grounded-sam", box=ibox, score=score)


class Segmenter:
    """Masks for a set of images: Grounding DINO + SAM if available, else (or per image, on a miss) GrabCut."""

    def __init__(self, cfg: SegmenterConfig = SegmenterConfig()):
        cfg.check()
        self.cfg = cfg
        self.grounded: GroundedSam | None = None
        self.status = "grabcut (chosen with --segmenter grabcut)"
        if cfg.method in ("auto", "grounded-sam"):
            try:
                self.grounded = GroundedSam.load(cfg)
                self.status = f"grounded-sam ({cfg.detector} + {cfg.sam})"
            except FileNotFoundError as e:
                if cfg.method == "grounded-sam":
                    raise
                self.status = f"GrabCut fallback, Grounding DINO/SAM not available: {e}"
                log.info("%s", self.status)

    def __call__(self, image, class_word: str, faces=None) -> Segmentation:
        """`image` is a PIL RGB image; `faces`, the faces already found in it (for the GrabCut fallback)."""
        rgb = np.asarray(image.convert("RGB"))
        if self.grounded is not None:
            seg = self.grounded(image, class_word)
            if seg is not None:
                return seg
            fallback = grabcut_mask(rgb, class_word, faces=faces)
            note = f"Grounding DINO found no {class_word!r} above {self.cfg.box_threshold}; GrabCut fallback"
            note += f" ({fallback.note})" if fallback.note else ""
            return Segmentation(fallback.mask, fallback.method, fallback.box, note=note)
        return grabcut_mask(rgb, class_word, faces=faces)


def read_user_mask(path: str | Path, size: tuple[int, int], working_size: tuple[int, int] | None = None) -> np.ndarray:
    """A user's mask image as (H, W) bool: white (> 127) is the subject; its alpha if it has transparency.

    `size` is the reference photo's (width, height); a mask of another size is an error naming the file.
    `working_size`: the photo was downscaled on load to this size, and the mask is too.
    """
    from PIL import Image

    from .video import open_image

    path = Path(path)
    im = open_image(path, "--masks: mask", max_side=max(working_size) if working_size else None)
    source = im.info["source_size"]
    if tuple(source) != tuple(size):
        raise ValueError(
            f"--masks: {str(path)!r} is {source[0]}x{source[1]} but its image is {size[0]}x{size[1]}; "
            "a mask must have its image's size"
        )
    if im.mode in ("RGBA", "LA") and im.getchannel("A").getextrema()[0] < 255:
        im = im.getchannel("A")
    else:
        im = im.convert("L")
    if working_size and im.size != tuple(working_size):
        im = im.resize(tuple(working_size), Image.BILINEAR)
    mask = np.asarray(im) > 127
    if not mask.any():
        raise ValueError(f"--masks: {str(path)!r} is empty (no white pixels); the subject must be white")
    return mask
