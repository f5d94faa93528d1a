"""Faces for Face VCD (§4.3), `prepare` and the face-identity score: detection, landmarks, tracks, descriptors.

The trained models come from the package index (the `[faces]` extra): dlib (`dlib-bin`, prebuilt wheels)
and Davis King's model files in `face-recognition-models` (CC0): the HOG face detector built into dlib,
the CNN (MMOD) face detector, the 5-point landmark model and the 128-D ResNet face descriptor (99.38 % on
LFW; two photos show the same person when their descriptors are less than 0.6 apart). OpenCV's Haar
cascade and YuNet (an .onnx file) remain as detectors that need no dlib.

Every detection becomes a `Face`: a box (x0, y0, x1, y1) in the pixels of the image given, the
detector's confidence, and, with dlib, the 5 landmarks. With dlib the box is derived from the landmarks
(the square dlib aligns a face to), so HOG, CNN, Haar and YuNet give boxes of one kind. Small faces are
found by running the detector on an upscaled copy (`min_face`).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'magicme[faces]'"
SAME_PERSON_DISTANCE = 0.6  # dlib's threshold on the Euclidean distance of two 128-D descriptors
DETECTORS = ("hog", "cnn", "haar")  # or the path of a YuNet .onnx file
# Side in pixels of the smallest face each detector finds at scale 1 (its sliding window): HOG and
# MMOD look for 80 px faces, the Haar cascade for 24 px; YuNet finds faces from about 10 px, 20 to be safe.
DETECTOR_WINDOW = {"hog": 80, "cnn": 80, "haar": 24, "yunet": 20}
# Mean detector confidence a track needs before Face VCD re-renders it, on each detector's own scale:
# HOG's SVM margin and MMOD's confidence are about 0.7–2 on real faces; the Haar cascade's stage
# weight is 4–10 on faces and below 1 on false detections in our photos; YuNet's is a probability.
MIN_TRACK_SCORE = {"hog": 0.3, "cnn": 0.3, "haar": 2.0, "yunet": 0.8, "custom": 0.0}
BOX_PADDING = 0.2  # the landmark box: dlib's aligned face square with this padding (forehead to chin)
MODEL_FILES = {
    "cnn": "mmod_human_face_detector.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
}
# class words that name a person: faces are looked for (prepare) and scored (evaluate) for these
PERSON_WORDS = frozenset(
    "person man woman boy girl child kid baby people human lady guy gentleman teenager player actor actress".split()
)

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def is_person(class_word: str) -> bool:
    """Whether a class word ('woman', 'young man', 'Person') names a person."""
    return any(w in PERSON_WORDS for w in str(class_word).lower().replace("-", " ").split())


# ---- packages ---------------------------------------------------------------------------------------


def model_dir() -> Path | None:
    """The folder of face-recognition-models' files, or None when that package is not installed.

    Found without importing the package: its __init__ needs pkg_resources, which new setuptools dropped.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    return folder if all((folder / f).is_file() for f in MODEL_FILES.values()) else None


def missing_packages() -> str | None:
    """None when dlib and its model files are installed; else one line saying what is missing and how to get it."""
    missing = [name for name, ok in (("dlib-bin", importlib.util.find_spec("dlib") is not None),
                                     ("face-recognition-models", model_dir() is not None)) if not ok]
    if not missing:
        return None
    return f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed ({INSTALL_HINT})"


def versions() -> dict[str, str | None]:
    """Versions of the face packages, for run records and result configurations."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("dlib-bin", "face-recognition-models"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ---- faces and boxes (pure functions) -------------------------------------------------------------


@dataclass(frozen=True)
class Face:
    """One detected face in an image."""

    box: Box  # x0, y0, x1, y1 in the image's pixels
    score: float  # the detector's confidence, on its own scale (see MIN_TRACK_SCORE)
    landmarks: np.ndarray | None = None  # (5, 2) x, y: dlib's 5 points (eye corners, base of the nose)

    @property
    def side(self) -> float:
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])


def as_face(item) -> Face:
    """A `Face`, or a plain (x, y, width, height) box from a caller's detector (confidence 1)."""
    if isinstance(item, Face):
        return item
    x, y, w, h = (float(v) for v in item)
    return Face((x, y, x + w, y + h), 1.0)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def work_scale(height: int, width: int, min_face: float, window: int, max_side: int) -> float:
    """Scale at which the detector runs: a face of `min_face` px grows to the detector's `window`,
    unless that makes the longer side exceed `max_side` (then the scale that fits; < 1 shrinks big photos)."""
    return min(window / min_face, max_side / max(height, width))


def suppress_overlaps(faces: list[Face], max_iou: float = 0.5) -> list[Face]:
    """Non-maximum suppression: of faces overlapping by more than `max_iou`, keep the most confident."""
    kept: list[Face] = []
    for f in sorted(faces, key=lambda f: -f.score):
        if all(iou(f.box, k.box) <= max_iou for k in kept):
            kept.append(f)
    return kept


def largest(faces: Sequence[Face]) -> Face | None:
    return max(faces, key=lambda f: f.side, default=None)


def descriptor_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dlib's face distance: Euclidean distance of 128-D descriptors, (N, D) × (M, D) → (N, M); < 0.6: same person."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    return np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))


def descriptor_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of descriptors, (N, D) × (M, D) → (N, M)."""
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def distance_to_others(descriptors: Sequence[np.ndarray | None]) -> list[float | None]:
    """For each descriptor, the median dlib distance to the other (non-None) ones; None without a face or
    another face to compare with. The median names the odd one out of a set of one person's photos."""
    found = [i for i, d in enumerate(descriptors) if d is not None]
    out: list[float | None] = [None] * len(descriptors)
    if len(found) < 2:
        return out
    dist = descriptor_distance(np.stack([descriptors[i] for i in found]), np.stack([descriptors[i] for i in found]))
    for row, i in enumerate(found):
        out[i] = float(np.median(np.delete(dist[row], row)))
    return out


# ---- detectors --------------------------------------------------------------------------------------

Detector = Callable[[np.ndarray], list]  # (H, W, 3) uint8 RGB → faces: `Face`s or (x, y, w, h) boxes


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    if abs(scale - 1) < 1e-6:
        return np.ascontiguousarray(image)
    h, w = image.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


class FaceFinder:
    """A face detector with dlib's landmarks and (optionally) its 128-D descriptor, models loaded once.

    `kind`: "hog" (dlib's HOG + linear SVM), "cnn" (dlib's MMOD CNN: better on small and turned faces,
    slow on a CPU), "haar" (OpenCV's cascade) or a YuNet .onnx file. Faces smaller than `min_face` px are
    not looked for; smaller values upscale the image more (slower). With dlib installed every detection
    is refined by the 5-point landmark model and gets the landmark box.
    """

    def __init__(self, kind: str = "hog", *, min_face: float = 24, max_side: int = 2048, descriptors: bool = False):
        if not min_face > 0:
            raise ValueError(f"--min-face must be > 0 pixels, got {min_face!r}")
        self.kind, self.min_face, self.max_side = kind, float(min_face), int(max_side)
        self.name = "yunet" if kind not in DETECTORS else kind
        models = model_dir()
        has_dlib = importlib.util.find_spec("dlib") is not None and models is not None
        if kind in ("hog", "cnn") and not has_dlib:
            raise ValueError(f"--detector {kind} needs dlib's face models: {missing_packages()}")
        if descriptors and not has_dlib:
            raise ValueError(f"the face descriptor needs dlib's face models: {missing_packages()}")
        self._landmarks = self._descriptor = None
        if has_dlib:
            import dlib

            self._landmarks = dlib.shape_predictor(str(models / MODEL_FILES["landmarks"]))
            if descriptors:
                self._descriptor = dlib.face_recognition_model_v1(str(models / MODEL_FILES["descriptor"]))
        self._raw = self._raw_detector(kind, models)

    @property
    def landmarks(self) -> bool:
        return self._landmarks is not None

    def describe(self) -> str:
        """What detects, for run records: 'dlib HOG, 5-point landmark boxes, min face 24 px'."""
        what = {"hog": "dlib HOG", "cnn": "dlib MMOD CNN", "haar": "OpenCV Haar cascade"}.get(self.kind, f"YuNet {Path(self.kind).name}")
        return f"{what}, {'5-point landmark boxes' if self.landmarks else 'detector boxes'}, min face {self.min_face:g} px"

    def _raw_detector(self, kind: str, models: Path | None) -> Callable[[np.ndarray], list[tuple[Box, float]]]:
        """detect(work image) → [(box in work pixels, score)]."""
        import cv2

        if kind == "hog":
            import dlib

            hog = dlib.get_frontal_face_detector()

            def detect(img):
                rects, scores, _ = hog.run(img, 0, 0.0)
                return [((r.left(), r.top(), r.right() + 1, r.bottom() + 1), float(s)) for r, s in zip(rects, scores)]

            return detect
        if kind == "cnn":
            import dlib

            mmod = dlib.cnn_face_detection_model_v1(str(models / MODEL_FILES["cnn"]))

            def detect(img):
                return [((d.rect.left(), d.rect.top(), d.rect.right() + 1, d.rect.bottom() + 1), float(d.confidence)) for d in mmod(img, 0)]

            return detect
        if kind == "haar":
            xml = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / "haarcascade_frontalface_default.xml"
            if not hasattr(cv2, "CascadeClassifier") or not xml.is_file():
                raise ValueError(
                    f"OpenCV {cv2.__version__} has no bundled Haar face cascade (OpenCV 5 moved it to contrib): "
                    f"use --detector hog ({INSTALL_HINT}) or install opencv-python-headless<5"
                )
            cascade = cv2.CascadeClassifier(str(xml))
            window = DETECTOR_WINDOW["haar"]

            def detect(img):
                grey = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))
                rects, _, weights = cascade.detectMultiScale3(grey, scaleFactor=1.1, minNeighbors=5, minSize=(window, window),
                                                              outputRejectLevels=True)
                return [((x, y, x + w, y + h), float(s)) for (x, y, w, h), s in zip(np.reshape(rects, (-1, 4)), np.ravel(weights))]

            return detect
        path = Path(kind)
        if not path.is_file():
            raise FileNotFoundError(f"--detector {kind!r} is neither hog, cnn, haar nor an existing YuNet .onnx file")
        try:
            net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), 0.7)
        except cv2.error as e:
            first = str(e).strip().splitlines()[-1]
            raise ValueError(f"--detector {str(path)!r} is not a YuNet .onnx model OpenCV can read ({first})") from None

        def detect(img):
            net.setInputSize((img.shape[1], img.shape[0]))
            _, found = net.detect(np.ascontiguousarray(img[..., ::-1]))
            return [] if found is None else [((f[0], f[1], f[0] + f[2], f[1] + f[3]), float(f[14])) for f in found]

        return detect

    def _work_image(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"face detection needs an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        scale = work_scale(image.shape[0], image.shape[1], self.min_face, DETECTOR_WINDOW[self.name], self.max_side)
        return _resize(image, scale), scale

    def __call__(self, image: np.ndarray) -> list[Face]:
        """The faces in an (H, W, 3) uint8 RGB image, most confident first, boxes in its pixels."""
        work, scale = self._work_image(image)
        faces = []
        for box, score in self._raw(work):
            shape = self._shape(work, box)
            if shape is not None:  # dlib puts pixel centres on integers; ours (like cv2.resize) on i + 0.5
                box = self._landmark_box(shape)
                points = (np.array([(p.x, p.y) for p in shape.parts()], np.float64) + 0.5) / scale
            else:
                points = None
            faces.append(Face(tuple(float(v) / scale for v in box), score, points))
        return suppress_overlaps(faces)

    def _shape(self, work: np.ndarray, box):
        if self._landmarks is None:
            return None
        import dlib

        x0, y0, x1, y1 = (int(round(v)) for v in box)
        return self._landmarks(work, dlib.rectangle(x0, y0, x1 - 1, y1 - 1))

    @staticmethod
    def _landmark_box(shape) -> Box:
        """The square dlib aligns this face to (its chip, padded by BOX_PADDING), upright, in work pixels."""
        import dlib

        r = dlib.get_face_chip_details(shape, 150, BOX_PADDING).rect
        cx, cy = (r.left() + r.right()) / 2 + 0.5, (r.top() + r.bottom()) / 2 + 0.5
        half = max(r.width(), r.height()) / 2
        return cx - half, cy - half, cx + half, cy + half

    def descriptor(self, image: np.ndarray, face: Face) -> np.ndarray:
        """dlib's 128-D descriptor of one face (found by this finder, so it has landmarks).

        The face is cut out with room around it and scaled to about 200 px first, so a small face's
        landmarks keep sub-pixel precision (dlib's points are integers).
        """
        import dlib

        if self._descriptor is None or face.landmarks is None:
            raise ValueError("descriptor() needs a FaceFinder made with descriptors=True and a face it found")
        image = np.asarray(image)
        side = face.side
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        x0, y0 = int(max(0, np.floor(cx - side))), int(max(0, np.floor(cy - side)))
        x1, y1 = int(min(image.shape[1], np.ceil(cx + side))), int(min(image.shape[0], np.ceil(cy + side)))
        scale = 200.0 / side
        crop = _resize(image[y0:y1, x0:x1], scale)
        pts = (face.landmarks - [x0, y0]) * scale - 0.5
        bx0, by0, bx1, by1 = (int(round(v)) for v in (np.array(face.box) - [x0, y0, x0, y0]) * scale)
        rect = dlib.rectangle(bx0, by0, bx1 - 1, by1 - 1)
        shape = dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in pts])
        return np.asarray(self._descriptor.compute_face_descriptor(crop, shape), np.float32)

    def largest_descriptor(self, image: np.ndarray) -> np.ndarray | None:
        """The descriptor of the largest face in the image, or None when there is no face."""
        face = largest(self(image))
        return None if face is None else self.descriptor(image, face)


class FaceDescriptor:
    """The face-identity model of `evaluate` and `prepare`: image → dlib's 128-D descriptor of its largest
    face (None without one). Faces under `min_face` px give poor descriptors and are not looked for."""

    same_person_distance = SAME_PERSON_DISTANCE

    def __init__(self, min_face: float = 40, max_side: int = 2048):
        self.finder = FaceFinder("hog", min_face=min_face, max_side=max_side, descriptors=True)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        return self.finder.largest_descriptor(image)


def make_detector(kind: str = "hog", *, min_face: float = 24) -> tuple[FaceFinder, str]:
    """The Face VCD detector for `--detector`, and a note for the run record.

    Without dlib the default HOG falls back to OpenCV's Haar cascade with one warning naming what is
    missing; an explicit `cnn` is an error (nothing else does what it does).
    """
    if kind == "hog" and missing_packages():
        note = f"{missing_packages()}: Face VCD uses OpenCV's Haar cascade instead (weaker on small and turned faces)"
        log.warning("%s", note)
        return FaceFinder("haar", min_face=min_face), note
    return FaceFinder(kind, min_face=min_face), ""


# ---- tracks -----------------------------------------------------------------------------------------


@dataclass
class FaceTrack:
    """One face across consecutive frames `frames`; `boxes` (T, 4) x0, y0, x1, y1, interpolated where unseen."""

    frames: list[int]
    boxes: np.ndarray
    seen: np.ndarray  # (T,) bool: the detector found the face in that frame
    scores: np.ndarray  # (T,) detector confidence, nan where unseen

    @property
    def n_seen(self) -> int:
        return int(self.seen.sum())

    @property
    def score(self) -> float:
        return float(np.nanmean(self.scores)) if self.n_seen else float("nan")

    def record(self, n_frames: int) -> list[list[float] | None]:
        """Per-frame boxes of the whole clip, [x0, y0, x1, y1] rounded to 0.1 px, None where the face was not seen."""
        out: list[list[float] | None] = [None] * n_frames
        for f, box, seen in zip(self.frames, self.boxes, self.seen):
            if seen:
                out[f] = [round(float(v), 1) for v in box]
        return out


def _match_cost(a: Box, b: Box, gap: int) -> float | None:
    """How far box b is from the track's last box a, in face sides per frame elapsed; None if too far or resized.

    Two faces side by side are more than a face side apart; one face moves less than that per frame.
    """
    sa, sb = max(a[2] - a[0], a[3] - a[1]), max(b[2] - b[0], b[3] - b[1])
    if min(sa, sb) <= 0 or max(sa, sb) / min(sa, sb) > 2.0**gap:
        return None
    dist = np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2) / ((sa + sb) / 2) / gap
    return dist if dist <= 0.75 else None


def track_faces(detections: Sequence[Sequence], max_gap: int = 3) -> list[FaceTrack]:
    """Link per-frame detections (`Face`s or (x, y, w, h) boxes) into tracks, greedily, nearest first.

    A detection joins an open track when its centre moved less than 0.75 face sides per frame since
    the track was last seen and its size changed less than 2× per frame. A face missed for up to
    `max_gap` frames keeps its track; the missed frames get boxes interpolated linearly (detectors
    flicker; the face has not left). Tracks are sorted by first frame.
    """
    open_tracks: list[dict] = []
    closed: list[dict] = []
    for t, found in enumerate(detections):
        faces = [as_face(f) for f in found]
        for tr in [tr for tr in open_tracks if t - tr["frames"][-1] > max_gap + 1]:
            open_tracks.remove(tr)
            closed.append(tr)
        pairs = sorted(
            (cost, i, j)
            for i, tr in enumerate(open_tracks)
            for j, f in enumerate(faces)
            if (cost := _match_cost(tr["boxes"][-1], f.box, t - tr["frames"][-1])) is not None
        )
        used_tracks, used_faces = set(), set()
        for _, i, j in pairs:
            if i in used_tracks or j in used_faces:
                continue
            used_tracks.add(i)
            used_faces.add(j)
            tr = open_tracks[i]
            tr["frames"].append(t), tr["boxes"].append(faces[j].box), tr["scores"].append(faces[j].score)
        for j, f in enumerate(faces):
            if j not in used_faces:
                open_tracks.append({"frames": [t], "boxes": [f.box], "scores": [f.score]})
    tracks = []
    for tr in sorted(closed + open_tracks, key=lambda tr: tr["frames"][0]):
        frames = np.arange(tr["frames"][0], tr["frames"][-1] + 1)
        known = np.asarray(tr["boxes"], dtype=np.float64)
        boxes = np.stack([np.interp(frames, tr["frames"], known[:, k]) for k in range(4)], axis=1)
        seen = np.isin(frames, tr["frames"])
        scores = np.full(len(frames), np.nan)
        scores[np.asarray(tr["frames"]) - frames[0]] = tr["scores"]
        tracks.append(FaceTrack(frames=frames.tolist(), boxes=boxes, seen=seen, scores=scores))
    return tracks


def track_verdict(track: FaceTrack, min_frames: int, min_score: float) -> str:
    """'' when the track is a face to re-render, else why not: seen in too few frames or too unsure.

    A false detection is brief and weak; re-rendering it alone would make a face pop up for a frame.
    """
    if track.n_seen < min_frames:
        return f"seen in {track.n_seen} frame(s), fewer than {min_frames}"
    if not track.score >= min_score:
        return f"mean detector score {track.score:.2f} below {min_score:g}"
    return ""
