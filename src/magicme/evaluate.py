"""The paper's video metrics (§5.2): identity alignment, text alignment and temporal smoothness.

- CLIP-I / DINO: mean cosine similarity between every generated frame and every reference image,
  in CLIP image-embedding space / DINO ViT-S/16 CLS-feature space. DINO sees its own evaluation
  transform (Resize 256 bicubic → CenterCrop 224 → ImageNet mean/std), as DreamBooth's and Custom
  Diffusion's DINO scores do; CLIP sees its processor's (the paper's CLIP-I/CLIP-T).
- CLIP-T: mean CLIP text–image similarity of each frame with its prompt, the identity token
  replaced by the class word (the metric models do not know the token).
- Temporal consistency: mean CLIP and DINO similarity of consecutive frames.
- Face identity (people): dlib's 128-D descriptor of the largest face in each frame against each
  reference photo: mean cosine similarity, mean dlib distance (same person below 0.6) and the share of
  frames with a face (`face_coverage`). On by default when the class word names a person and the
  `[faces]` extra is installed; OpenCV's SFace can replace dlib.

The math is small pure functions on embeddings; `Scorer` owns the models (loaded once, batched,
no grad, on the GPU when there is one) and caches the reference embeddings of each folder.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .faces import SAME_PERSON_DISTANCE, descriptor_distance, is_person, missing_packages
from .identity import token_pattern
from .video import IMAGE_SUFFIXES, open_image, to_uint8

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # §5.2 CLIP-I / CLIP-T
DEFAULT_DINO = "facebook/dino-vits16"  # §5.2 DINO (ViT-S/16)
TINY = "tiny"  # the random-weight test models, built offline (tiny_metric_components)
METRICS = ("dino", "clip_i", "clip_t", "temporal_dino", "temporal_clip")  # Table 1's rows, in its order
FACE_SCORES = ("auto", "on", "off")  # --face-score: auto = for people (class word), when dlib is installed
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO's input normalisation (facebookresearch/dino, eval_linear.py)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- the math: pure functions on embeddings ---------------------------------------------------


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D) × (M, D) → (N, M) cosine similarities."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return a @ b.T


def _need_frames(frames: torch.Tensor, least: int, what: str) -> None:
    if frames.ndim != 2 or frames.shape[0] < least:
        raise ValueError(f"{what} needs at least {least} frame embedding(s) of shape (F, D), got {tuple(frames.shape)}")


def identity_alignment(frames: torch.Tensor, references: torch.Tensor) -> float:
    """CLIP-I or DINO (§5.2): mean over all (frame, reference) pairs of their cosine similarity.

    frames: (F, D) embeddings of the generated frames; references: (R, D) of the reference images.
    """
    _need_frames(frames, 1, "identity alignment")
    _need_frames(references, 1, "identity alignment (references)")
    return float(cosine_matrix(frames, references).mean())


def text_alignment(frames: torch.Tensor, text: torch.Tensor) -> float:
    """CLIP-T (§5.2): mean cosine similarity of each frame's CLIP image embedding with the prompt's
    CLIP text embedding. frames: (F, D); text: (D,) or (1, D)."""
    _need_frames(frames, 1, "text alignment")
    return float(cosine_matrix(frames, text.reshape(1, -1)).mean())


def temporal_consistency(frames: torch.Tensor) -> float:
    """Temporal consistency (§5.2): mean cosine similarity of consecutive frames, (F, D) with F ≥ 2."""
    _need_frames(frames, 2, "temporal consistency")
    a = torch.nn.functional.normalize(frames.double(), dim=-1)
    return float((a[1:] * a[:-1]).sum(-1).mean())


def motion_magnitude(frames: np.ndarray) -> float:
    """How much a clip moves: mean absolute pixel change between consecutive frames, in [0, 1].

    frames: (F, H, W, 3) uint8 or floats in [0, 1]. A still clip scores 0. Flow-free on purpose:
    it needs no extra model and is monotone in the pixel change temporal consistency rewards.
    """
    arr = to_uint8(frames).astype(np.float32) / 255.0
    if arr.shape[0] < 2:
        raise ValueError(f"motion magnitude needs at least 2 frames, got {arr.shape[0]}")
    return float(np.abs(arr[1:] - arr[:-1]).mean())


def scoring_prompt(prompt: str, token: str, class_word: str) -> str:
    """The prompt CLIP-T scores: the identity token replaced by the class word (§5.2).

    'a <v*> dog on the beach' → 'a dog on the beach' (a class word right after the token is
    kept once, not doubled, in any case: 'a <v*> Dog' → 'a Dog'); 'photo of <v*>' → 'photo of dog'.
    """
    if not class_word.strip():
        raise ValueError(f"--class-word is needed to score the prompt {prompt!r} (it holds the token {token!r})")
    pat = token_pattern(token)
    followed = re.compile(pat.pattern + rf"\s+(?=(?i:{re.escape(class_word.strip())})\b)")
    out = pat.sub(class_word, followed.sub("", prompt))
    return re.sub(r"\s+", " ", out).strip()


def dino_pixels(images: Sequence[np.ndarray], crop: int = 224) -> torch.Tensor:
    """DINO's evaluation transform: Resize(256, bicubic) → CenterCrop(224) → ImageNet mean/std → (N, 3, 224, 224).

    As in facebookresearch/dino's eval_linear.py (torchvision on PIL images), with torchvision's rounding:
    the shorter side becomes 256 and the longer int(256 · long / short); the crop starts at round((side − 224) / 2).
    A model made for another input size (`crop`) gets the same 256/224 ratio. images: (H, W, 3) uint8 or [0, 1].
    """
    from PIL import Image

    side = round(crop * 256 / 224)
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    out = []
    for image in images:
        im = Image.fromarray(to_uint8(np.asarray(image)[None])[0])
        w, h = im.size
        if min(w, h) != side:
            long = int(side * max(w, h) / min(w, h))
            im = im.resize((side, long) if w <= h else (long, side), Image.Resampling.BICUBIC)
        w, h = im.size
        top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
        x = np.asarray(im.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
        out.append((x - mean) / std)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


# ---- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricModels:
    """Which models score: any CLIP (e.g. openai/clip-vit-large-patch14) and any ViT/DINOv2 (e.g. facebook/dinov2-small),
    by hub id or folder; 'tiny' builds a random-weight test model offline (meaningless scores)."""

    clip: str = DEFAULT_CLIP  # §5.2
    dino: str = DEFAULT_DINO  # §5.2
    batch_size: int = 32

    def check(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be an integer >= 1, got {self.batch_size!r}")
        for arg, name in (("--clip-model", self.clip), ("--dino-model", self.dino)):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{arg} must name a hub id or a local folder, got {name!r}")


def _load(cls, arg: str, name: str, **kwargs):
    """`cls.from_pretrained(name)` with a missing/unreadable model turned into one clear error."""
    from .models import weights_hint

    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if Path(name).expanduser().exists():
            raise FileNotFoundError(f"{arg} {name!r} could not be loaded ({first}); give a folder saved with save_pretrained") from None
        raise FileNotFoundError(
            f"{arg} {name!r} could not be loaded: {weights_hint(name)}; or '{arg} tiny' for a random-weight test model "
            "(meaningless scores)"
        ) from None


def load_reference_images(folder: str | Path) -> list[np.ndarray]:
    """The reference photos of a subject: every image file in `folder`, sorted, as (H, W, 3) uint8.

    A corrupt or bomb image is an error naming it (a score must not silently skip a reference); photos
    larger than 4096 px are downscaled on load (the metric models see 224 px).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--references {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"--references {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [np.asarray(open_image(p, "--references: image", max_side=4096).convert("RGB")) for p in files]


def _folder_key(folder: Path) -> tuple:
    """Cache key of a reference folder: its files' names, sizes and modification times."""
    return (str(folder.resolve()),) + tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
    )


FaceEmbedder = Callable[[np.ndarray], "np.ndarray | None"]
"""A face-identity model: (H, W, 3) uint8 RGB image → 1-D embedding of its main face, or None if no face."""


class Scorer:
    """Loads CLIP and DINO once and scores videos; reference embeddings are computed once per folder."""

    def __init__(self, models: MetricModels = MetricModels(), device: str | torch.device | None = None,
                 face: FaceEmbedder | None = None, face_people_only: bool = False):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        models.check()
        self.models = models
        from .models import pick_device

        self.device = pick_device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        tiny = tiny_metric_components() if TINY in (models.clip, models.dino) else {}
        if models.clip == TINY:
            self.clip, self.clip_processor, self.clip_tokenizer = tiny["clip"], tiny["clip_processor"], tiny["clip_tokenizer"]
        else:  # backend="pil": the torchvision-free processors, identical resize/crop/normalise
            self.clip = _load(CLIPModel, "--clip-model", models.clip, dtype=dtype)
            self.clip_processor = _load(AutoImageProcessor, "--clip-model", models.clip, backend="pil")
            self.clip_tokenizer = _load(AutoTokenizer, "--clip-model", models.clip)
        if models.dino == TINY:
            self.dino = tiny["dino"]
        else:  # DINO ViT checkpoints carry no pooler; we read the CLS token, so don't build a random one
            dino_config = _load(AutoConfig, "--dino-model", models.dino)
            extra = {"add_pooling_layer": False} if dino_config.model_type == "vit" else {}
            self.dino = _load(AutoModel, "--dino-model", models.dino, dtype=dtype, **extra)
        self.clip = self.clip.to(self.device, dtype).eval()
        self.dino = self.dino.to(self.device, dtype).eval()
        # not the hub processor (facebook/dino-vits16's squashes to 224² with mean/std 0.5): DINO's own transform;
        # DINOv2 interpolates its position embeddings and is evaluated at 224 like DINO
        self.dino_crop = 224 if self.dino.config.model_type == "dinov2" else int(self.dino.config.image_size)
        self.face = face
        self.face_people_only = face_people_only  # score faces only for class words naming a person
        self._references: dict[tuple, dict[str, torch.Tensor | None]] = {}

    @torch.no_grad()
    def clip_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) CLIP image embeddings (projected), computed in batches of `batch_size`, on the CPU."""
        return self._batched(images, self._clip_pixels, self._clip_forward)

    @torch.no_grad()
    def dino_images(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) DINO features: the CLS token of the last layer (ViT and DINOv2 alike)."""
        return self._batched(
            images, lambda batch: dino_pixels(batch, self.dino_crop), lambda px: self.dino(pixel_values=px).last_hidden_state[:, 0]
        )

    @torch.no_grad()
    def clip_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) CLIP text embeddings (projected)."""
        tok = self.clip_tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.clip.get_text_features(**tok)
        return getattr(out, "pooler_output", out).float().cpu()

    def _clip_pixels(self, images) -> torch.Tensor:
        return self.clip_processor(images=images, return_tensors="pt")["pixel_values"]

    def _clip_forward(self, px: torch.Tensor) -> torch.Tensor:
        out = self.clip.get_image_features(pixel_values=px)
        return getattr(out, "pooler_output", out)  # transformers 5 returns a model output, 4.x a tensor

    def _batched(self, images, pixels, forward) -> torch.Tensor:
        images = list(images)
        if not images:
            raise ValueError("no images to embed (a video of zero frames?)")
        dtype = next(self.clip.parameters()).dtype
        out = []
        for i in range(0, len(images), self.models.batch_size):
            px = pixels(images[i : i + self.models.batch_size])
            out.append(forward(px.to(self.device, dtype)).float().cpu())
        return torch.cat(out)

    def reference_embeddings(self, folder: str | Path, faces: bool = False) -> dict[str, torch.Tensor | None]:
        """CLIP, DINO (and, with `faces`, face) embeddings of a reference folder, cached until its files change."""
        folder = Path(folder)
        images = load_reference_images(folder)
        key = _folder_key(folder)
        if key not in self._references:
            self._references[key] = {"clip": self.clip_images(images), "dino": self.dino_images(images), "face": None}
        entry = self._references[key]
        if faces and entry["face"] is None:
            entry["face"] = face_embeddings(self.face, images)
            if entry["face"].shape[0] < len(images):
                log.warning("--references %s: no face found in %d of %d photos; the face score uses the others",
                            folder, len(images) - entry["face"].shape[0], len(images))
        return entry

    def scores_faces(self, class_word: str) -> bool:
        return self.face is not None and (not self.face_people_only or is_person(class_word))

    def score(self, frames, references: str | Path, prompt: str, *, token: str | None = None,
              class_word: str = "") -> dict[str, float | int | str | None]:
        """All metrics of one clip. frames: (F, H, W, 3) uint8 or floats in [0, 1], F ≥ 1.

        Temporal consistency and motion need F ≥ 2 and are None for a single frame.
        """
        arr = to_uint8(frames)
        text = scoring_prompt(prompt, token, class_word) if token and token_pattern(token).search(prompt) else prompt
        ref = self.reference_embeddings(references, faces=self.scores_faces(class_word))
        clip = self.clip_images(list(arr))
        dino = self.dino_images(list(arr))
        row: dict[str, float | int | str | None] = {
            "dino": identity_alignment(dino, ref["dino"]),
            "clip_i": identity_alignment(clip, ref["clip"]),
            "clip_t": text_alignment(clip, self.clip_texts([text])[0]),
            "temporal_dino": temporal_consistency(dino) if len(arr) > 1 else None,
            "temporal_clip": temporal_consistency(clip) if len(arr) > 1 else None,
            "motion": motion_magnitude(arr) if len(arr) > 1 else None,
            "frames": int(len(arr)),
            "scored_prompt": text,
        }
        if self.scores_faces(class_word):
            distance = getattr(self.face, "same_person_distance", None) is not None
            row.update(face_scores(self.face, list(arr), ref["face"], distance=distance))
        return row


# ---- face identity (optional) ------------------------------------------------------------------


def face_embeddings(embedder: FaceEmbedder, images: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, D) face embeddings of the images in which `embedder` finds a face (N may be 0)."""
    found = [e for e in (embedder(np.asarray(im)) for im in images) if e is not None]
    if not found:
        return torch.zeros(0, 0)
    return torch.as_tensor(np.stack([np.asarray(e, np.float32).reshape(-1) for e in found]))


def face_similarity(frames: torch.Tensor, references: torch.Tensor | None) -> float | None:
    """Mean cosine similarity of face embeddings of frames and references; None when either has no face."""
    if references is None or frames.shape[0] == 0 or references.shape[0] == 0:
        return None
    return float(cosine_matrix(frames, references).mean())


def face_scores(embedder: FaceEmbedder, frames: Sequence[np.ndarray], references: torch.Tensor,
                distance: bool = False) -> dict[str, float | None]:
    """The face-identity scores of a clip, over every (frame with a face, reference with a face) pair.

    face: mean cosine similarity of the embeddings; face_distance (with `distance`, for dlib's
    descriptor): mean Euclidean distance, the same person below 0.6; face_coverage: the share of frames
    in which a face was found (a clip with a face in 1 of 6 frames scores its face on that one frame).
    """
    found = face_embeddings(embedder, frames)
    row = {"face": face_similarity(found, references), "face_coverage": found.shape[0] / len(frames)}
    if distance:
        ok = found.shape[0] > 0 and references is not None and references.shape[0] > 0
        row["face_distance"] = float(descriptor_distance(found.numpy(), references.numpy()).mean()) if ok else None
    return row


def resolve_face_score(mode: str, face_model: str | Path | None = None, face_detector: str | Path | None = None,
                       *, people: bool) -> tuple[FaceEmbedder | None, bool]:
    """The face model for `--face-score` and whether it scores people only: (embedder or None, people_only).

    SFace (`--face-model`/`--face-detector`) scores every clip when given. Otherwise dlib's descriptor:
    `auto` scores clips of people (when `people`, a class word names one) and, without the `[faces]`
    extra, says once what is missing; `on` scores every clip and needs the extra; `off` scores none.
    """
    if mode not in FACE_SCORES:
        raise ValueError(f"--face-score must be one of {', '.join(FACE_SCORES)}, got {mode!r}")
    if mode == "off":
        return None, False
    if face_model is not None or face_detector is not None:
        return face_embedder(face_model, face_detector), False
    missing = missing_packages()
    if missing:
        if mode == "on":
            raise ValueError(f"--face-score on needs dlib's face models: {missing}")
        if people:
            log.warning("face-identity score skipped: %s", missing)
        return None, False
    from .faces import FaceDescriptor

    return FaceDescriptor(), mode == "auto"


def face_score_config(mode: str, face_model: str | Path | None, face_detector: str | Path | None) -> dict:
    """What the face score of a results file depends on: the mode and the model that would score."""
    from .models import fingerprint

    if mode == "off":
        return {"face_score": "off"}
    if face_model is not None:
        return {"face_score": mode, "face_model": fingerprint(face_model), "face_detector": fingerprint(face_detector)}
    from .faces import versions

    return {"face_score": mode, "face_models": versions() if missing_packages() is None else None,
            "same_person_distance": SAME_PERSON_DISTANCE}


def face_embedder(model: str | Path | None, detector: str | Path | None) -> "SFaceEmbedder | None":
    """The OpenCV face embedder for `--face-model`/`--face-detector`, or None when neither is given."""
    if model is None and detector is None:
        return None
    if model is None or detector is None:
        raise ValueError("--face-model and --face-detector go together (SFace recogniser + YuNet detector .onnx)")
    return SFaceEmbedder(model, detector)


class SFaceEmbedder:
    """Face embeddings with OpenCV: YuNet (`cv2.FaceDetectorYN`) finds the largest face, SFace
    (`cv2.FaceRecognizerSF`) aligns and embeds it. Both are .onnx files the user names (OpenCV Zoo:
    face_detection_yunet_2023mar.onnx, face_recognition_sface_2021dec.onnx)."""

    def __init__(self, recognizer: str | Path, detector: str | Path, score_threshold: float = 0.8):
        import cv2

        for arg, path in (("--face-model", recognizer), ("--face-detector", detector)):
            if not Path(path).is_file():
                raise FileNotFoundError(f"{arg} {str(path)!r} does not exist (an .onnx file from OpenCV Zoo)")
        try:
            self.detector = cv2.FaceDetectorYN.create(str(detector), "", (320, 320), score_threshold)
            self.recognizer = cv2.FaceRecognizerSF.create(str(recognizer), "")
        except cv2.error as e:
            raise ValueError(f"--face-model/--face-detector could not be read by OpenCV ({str(e).strip()})") from None

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        import cv2

        bgr = np.ascontiguousarray(image[..., ::-1])
        self.detector.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self.detector.detect(bgr)
        if faces is None or len(faces) == 0:
            return None
        largest = max(faces, key=lambda f: f[2] * f[3])
        return self.recognizer.feature(self.recognizer.alignCrop(bgr, largest)).reshape(-1)


def evaluate_video(video: str | Path, references: str | Path, prompt: str, *, token: str | None = None,
                   class_word: str = "", identity: str | Path | None = None, scorer: Scorer | None = None,
                   models: MetricModels = MetricModels(), device: str | None = None,
                   face: FaceEmbedder | None = None, face_score: str = "auto") -> dict:
    """Score one video file or frame folder against a reference folder (`magicme evaluate`).

    With `identity`, the token and class word come from the identity file unless given. `face` (an
    embedder) scores faces in every clip; else `face_score` decides (see `resolve_face_score`).
    """
    from .identity import read_identity_info
    from .video import read_video

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("--prompt must be a non-empty string")
    if identity is not None:
        info = read_identity_info(identity)
        token, class_word = token or info.token, class_word or info.class_word
    if token and token_pattern(token).search(prompt) and not class_word.strip():
        raise ValueError(f"--class-word is needed: the prompt holds the token {token!r} and the metric models do not know it")
    load_reference_images(references)  # fail on a bad folder before loading any model
    frames = read_video(video)
    people_only = False
    if face is None and scorer is None:
        face, people_only = resolve_face_score(face_score, people=is_person(class_word))
    scorer = scorer or Scorer(models, device=device, face=face, face_people_only=people_only)
    return scorer.score(frames, references, prompt, token=token, class_word=class_word)


def tiny_metric_components(seed: int = 0) -> dict:
    """A tiny random-weight CLIP and DINO (ViT) with their processors and tokenizer, built offline (`--clip-model tiny`).

    Scores from them are meaningless numbers; they exercise the scoring code without any download.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, ViTConfig, ViTImageProcessorPil, ViTModel

    from .tokenizer import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8),
            projection_dim=16,
        ))
        dino = ViTModel(ViTConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=32, patch_size=8), add_pooling_layer=False)
    return {
        "clip": clip.eval(),
        "clip_tokenizer": tokenizer,
        "clip_processor": CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        "dino": dino.eval(),
        "dino_processor": ViTImageProcessorPil(size={"height": 32, "width": 32}),  # for save_pretrained; scoring uses dino_pixels
    }


def save_tiny_metric_models(folder: str | Path, seed: int = 0) -> MetricModels:
    """The tiny metric models (`tiny_metric_components`) saved with save_pretrained: the by-path loading code on them."""
    folder = Path(folder)
    parts = tiny_metric_components(seed)
    for name in ("clip", "clip_tokenizer", "clip_processor"):
        parts[name].save_pretrained(folder / "clip")
    for name in ("dino", "dino_processor"):
        parts[name].save_pretrained(folder / "dino")
    return MetricModels(clip=str(folder / "clip"), dino=str(folder / "dino"))
