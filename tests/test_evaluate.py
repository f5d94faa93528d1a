import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from magicme.cli import main
from magicme.evaluate import (
    MetricModels,
    Scorer,
    evaluate_video,
    dino_pixels,
    face_similarity,
    identity_alignment,
    motion_magnitude,
    save_tiny_metric_models,
    scoring_prompt,
    temporal_consistency,
    text_alignment,
)
from magicme.identity import IdentityInfo, save_identity
from magicme.video import write_video


@pytest.fixture(scope="session")
def metric_models(tmp_path_factory):
    return save_tiny_metric_models(tmp_path_factory.mktemp("metric") / "models")


@pytest.fixture(scope="session")
def scorer(metric_models):
    return Scorer(metric_models, device="cpu")


def _images(seed, n, size=40):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def refs(tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    for i, im in enumerate(_images(1, 3)):
        Image.fromarray(im).save(folder / f"{i}.png")
    return folder


# ---- the math, on hand-made embeddings ----


def test_identity_alignment_hand_computed():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert identity_alignment(torch.stack([e1, e1]), torch.stack([e1 * 3])) == pytest.approx(1.0)  # identical → 1
    assert identity_alignment(torch.stack([e1]), torch.stack([e2])) == pytest.approx(0.0)  # orthogonal → 0
    # every (frame, reference) pair: cos(e1, e1+e2) = cos(e2, e1+e2) = 1/√2, cos(·, e1) = 1 and 0
    frames, references = torch.stack([e1, e2]), torch.stack([e1 + e2, e1])
    assert identity_alignment(frames, references) == pytest.approx((2 / math.sqrt(2) + 1 + 0) / 4)


def test_text_alignment_and_temporal_consistency_hand_computed():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    assert text_alignment(torch.stack([e1, e1 + e2 / 2]), e1) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert temporal_consistency(torch.stack([e1, e1, e1])) == pytest.approx(1.0)  # identical frames
    assert temporal_consistency(torch.stack([e1, e2, e1, e2])) == pytest.approx(0.0)  # orthogonal neighbours
    assert temporal_consistency(torch.stack([e1, e1, e2])) == pytest.approx(0.5)  # consecutive pairs only
    with pytest.raises(ValueError, match="at least 2"):
        temporal_consistency(torch.stack([e1]))
    with pytest.raises(ValueError, match="at least 1"):
        identity_alignment(torch.zeros(0, 3), torch.stack([e1]))


def test_motion_magnitude():
    still = np.full((4, 8, 8, 3), 77, np.uint8)
    assert motion_magnitude(still) == 0.0
    flicker = np.zeros((3, 8, 8, 3), np.uint8)
    flicker[1] = 255
    assert motion_magnitude(flicker) == pytest.approx(1.0)
    half = np.zeros((2, 8, 8, 3), np.float32)
    half[1, :4] = 1.0  # half the pixels change fully
    assert motion_magnitude(half) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a <v*> dog on the beach", "a dog on the beach"),
        ("a photo of <v*> in the snow", "a photo of dog in the snow"),
        ("<v*> dog and <v*>", "dog and dog"),
        ("a <v*>2 dog", "a <v*>2 dog"),  # another token, left alone
        ("a <v*> Dog in the snow", "a Dog in the snow"),  # the class word in another case is not doubled
        ("A <v*> DOG", "A DOG"),
        ("a <v*> doghouse", "a dog doghouse"),  # a longer word is not the class word
    ],
)
def test_scoring_prompt_replaces_token_by_class_word(prompt, expected):
    assert scoring_prompt(prompt, "<v*>", "dog") == expected


def test_face_similarity_with_an_injected_embedder(metric_models, refs):
    # a stand-in face model: embedding = mean colour, no face in dark images
    def embed(image):
        mean = image.reshape(-1, 3).mean(0)
        return None if mean.sum() < 30 else mean

    scorer = Scorer(metric_models, device="cpu", face=embed)
    red = np.zeros((3, 32, 32, 3), np.uint8)
    red[..., 0] = 200
    red[1] = 0  # no face in the middle frame
    got = scorer.score(red, refs, "a dog")["face"]
    ref_means = np.stack([np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3).mean(0) for p in sorted(refs.iterdir())])
    expected = (ref_means[:, 0] / np.linalg.norm(ref_means, axis=1)).mean()  # cos(e_red, ref) averaged
    assert got == pytest.approx(expected, rel=1e-6)
    assert face_similarity(torch.zeros(0, 0), torch.ones(2, 3)) is None


# ---- DINO's input transform ----


def test_dino_pixels_match_dinos_eval_transform():
    """facebookresearch/dino eval_linear.py: Resize(256, interpolation=3) → CenterCrop(224) → ToTensor →
    Normalize(ImageNet). Compared with transformers' BitImageProcessor set up the same way (shortest edge 256,
    bicubic, centre crop 224, ImageNet mean/std: DINOv2's hub configuration), on sizes where both round alike."""
    from transformers import BitImageProcessorPil

    reference = BitImageProcessorPil(
        size={"shortest_edge": 256}, resample=3, crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
    )
    rng = np.random.default_rng(0)
    for h, w in ((300, 200), (200, 300), (256, 256), (64, 96), (512, 512)):
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(2)]
        ours = dino_pixels(images)
        theirs = reference(images=images, return_tensors="pt")["pixel_values"]
        assert ours.shape == theirs.shape == (2, 3, 224, 224)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_dino_pixels_resize_and_crop_follow_torchvision():
    """An image whose every pixel holds its own coordinates: after Resize(256) a 200×300 (W×H) image is 256×384
    (torchvision truncates the long side), and CenterCrop(224) starts at row round((384 − 224) / 2) = 80."""
    h, w = 300, 200
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.linspace(0, 255, h).round().astype(np.uint8)[:, None]  # red = row
    px = dino_pixels([image])[0]
    red = px[0] * 0.229 + 0.485  # undo the normalisation
    rows = red[:, 112].numpy() * 255  # the column in the middle
    row_of = lambda y: y / (384 - 1) * 255  # noqa: E731  (red at resized row y, a linear ramp)
    assert abs(rows[0] - row_of(80)) < 1.5 and abs(rows[-1] - row_of(80 + 223)) < 1.5
    assert px[1].abs().max() <= 0.456 / 0.224 + 1e-5  # green 0: (0 − mean) / std everywhere


def test_scorer_feeds_dino_its_eval_transform(metric_models, scorer):
    """The DINO features are the model's CLS token on `dino_pixels`, not on the hub processor's squash."""
    from transformers import ViTModel

    frames = list(_images(7, 3, size=50))
    model = ViTModel.from_pretrained(metric_models.dino, add_pooling_layer=False).eval()
    with torch.no_grad():
        expected = model(pixel_values=dino_pixels(frames, 32)).last_hidden_state[:, 0]
    torch.testing.assert_close(scorer.dino_images(frames), expected, atol=1e-5, rtol=0)


# ---- the scorer on tiny real-architecture models saved with save_pretrained ----


def test_frames_equal_to_references_score_one(scorer, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    image = _images(2, 1)[0]
    Image.fromarray(image).save(folder / "ref.png")
    row = scorer.score(np.stack([image] * 4), folder, "a dog")
    assert row["clip_i"] == pytest.approx(1.0, abs=1e-5) and row["dino"] == pytest.approx(1.0, abs=1e-5)
    assert row["temporal_clip"] == pytest.approx(1.0, abs=1e-5) and row["temporal_dino"] == pytest.approx(1.0, abs=1e-5)
    assert row["motion"] == 0.0 and row["frames"] == 4


def test_metrics_match_the_pure_functions_and_clip_t_uses_the_class_word(scorer, refs):
    frames = _images(3, 5, size=48)
    row = scorer.score(frames, refs, "a <v*> dog on the beach", token="<v*>", class_word="dog")
    clip, dino = scorer.clip_images(list(frames)), scorer.dino_images(list(frames))
    ref_clip, ref_dino = scorer.clip_images(_ref_list(refs)), scorer.dino_images(_ref_list(refs))
    assert row["clip_i"] == pytest.approx(identity_alignment(clip, ref_clip), abs=1e-6)
    assert row["dino"] == pytest.approx(identity_alignment(dino, ref_dino), abs=1e-6)
    assert row["temporal_clip"] == pytest.approx(temporal_consistency(clip), abs=1e-6)
    assert row["scored_prompt"] == "a dog on the beach"
    with_class = text_alignment(clip, scorer.clip_texts(["a dog on the beach"])[0])
    with_token = text_alignment(clip, scorer.clip_texts(["a <v*> dog on the beach"])[0])
    assert row["clip_t"] == pytest.approx(with_class, abs=1e-6)
    assert abs(row["clip_t"] - with_token) > 1e-4


def _ref_list(folder):
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.iterdir())]


def test_batched_equals_frame_by_frame(metric_models, scorer):
    frames = list(_images(4, 7))
    one = Scorer(MetricModels(metric_models.clip, metric_models.dino, batch_size=1), device="cpu")
    assert torch.allclose(one.clip_images(frames), scorer.clip_images(frames), atol=1e-5)
    assert torch.allclose(one.dino_images(frames), scorer.dino_images(frames), atol=1e-5)


def test_reference_embeddings_are_cached_until_the_folder_changes(metric_models, refs, monkeypatch):
    s = Scorer(metric_models, device="cpu")
    calls = []
    real = s.clip_images
    monkeypatch.setattr(s, "clip_images", lambda images: calls.append(len(images)) or real(images))
    first = s.reference_embeddings(refs)["clip"]
    assert s.reference_embeddings(refs)["clip"] is first and calls == [3]
    Image.fromarray(_images(9, 1)[0]).save(refs / "new.png")
    assert s.reference_embeddings(refs)["clip"].shape[0] == 4 and calls == [3, 4]


def test_evaluate_video_reads_token_from_identity_and_rejects_bad_input(scorer, refs, tmp_path):
    video = write_video(_images(5, 4, size=32), tmp_path / "v.gif")
    ident = save_identity(tmp_path / "cat.safetensors", torch.randn(2, 32),
                          IdentityInfo(token="<c*>", class_word="cat", num_vectors=2, hidden_size=32))
    row = evaluate_video(video, refs, "a <c*> cat sleeping", identity=ident, scorer=scorer)
    assert row["scored_prompt"] == "a cat sleeping" and row["frames"] == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image frames"):
        evaluate_video(empty, refs, "a dog", scorer=scorer)  # a zero-frame video
    with pytest.raises(FileNotFoundError, match="--references"):
        evaluate_video(video, tmp_path / "nope", "a dog", scorer=scorer)
    with pytest.raises(ValueError, match="--class-word"):
        evaluate_video(video, refs, "a <v*> on the beach", token="<v*>", scorer=scorer)
    with pytest.raises(FileNotFoundError, match="--clip-model"):
        Scorer(MetricModels(clip=str(tmp_path / "no-model")), device="cpu")


def test_evaluate_cli(metric_models, refs, tmp_path, capsys):
    video = write_video(_images(6, 3, size=32), tmp_path / "v.gif")
    args = ["evaluate", "--video", str(video), "--references", str(refs), "--prompt", "a <v*> dog",
            "--token", "<v*>", "--class-word", "dog", "--clip-model", metric_models.clip, "--dino-model", metric_models.dino]
    assert main(args) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["scored_prompt"] == "a dog" and set(row) >= {"clip_i", "dino", "clip_t", "temporal_clip", "temporal_dino"}
    assert main(args + ["--face-model", "x.onnx"]) == 2
    assert "--face-detector" in capsys.readouterr().err
    assert main([*args[:2], str(tmp_path / "missing.mp4"), *args[3:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_sface_embedder_names_missing_or_unreadable_files(tmp_path):
    from magicme.evaluate import face_embedder

    assert face_embedder(None, None) is None
    with pytest.raises(ValueError, match="go together"):
        face_embedder(tmp_path / "sface.onnx", None)
    with pytest.raises(FileNotFoundError, match="--face-model"):
        face_embedder(tmp_path / "sface.onnx", tmp_path / "yunet.onnx")
    for name in ("sface.onnx", "yunet.onnx"):
        (tmp_path / name).write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="could not be read by OpenCV"):
        face_embedder(tmp_path / "sface.onnx", tmp_path / "yunet.onnx")
