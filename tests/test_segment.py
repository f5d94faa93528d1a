import numpy as np
import pytest
from PIL import Image

from magicme.segment import (
    GroundedSam,
    Segmenter,
    SegmenterConfig,
    box_to_body,
    central_box,
    fill_small_holes,
    grabcut_mask,
    haar_face_detector,
    read_user_mask,
)


def synthetic_subject(h=96, w=128, seed=0):
    """An orange ellipse on a flat blue background with mild noise; returns (rgb uint8, true mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = ((xx - w * 0.5) / (w * 0.22)) ** 2 + ((yy - h * 0.5) / (h * 0.3)) ** 2 < 1
    img = np.where(mask[..., None], [230, 90, 30], [40, 90, 200]) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_fill_small_holes_fills_only_small_enclosed_background():
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    m[10:12, 10:12] = False  # small hole: 4 px
    m[18:30, 18:30] = False  # big hole: 144 px
    out = fill_small_holes(m, max_fraction=0.01)  # limit 16 px
    assert out[10:12, 10:12].all() and not out[18:30, 18:30].any()
    assert not out[:5].any()  # background touching the border stays background
    assert (out | m).sum() == out.sum()  # only adds pixels


def test_box_to_body_grows_a_face_to_a_person_inside_the_image():
    face = (90, 20, 110, 44)  # 20 wide, 24 tall
    x0, y0, x1, y1 = box_to_body(face, 200, 300)
    assert x0 <= 90 and y0 <= 20 and x1 >= 110 and y1 >= 44  # contains the face
    assert x1 - x0 == pytest.approx(3.5 * 20, abs=1) and y1 == 20 + 7.5 * 24
    assert box_to_body((0, 0, 50, 50), 100, 100) == (0, 0, 100, 100)  # clipped


def test_grabcut_covers_a_synthetic_subject_on_a_flat_background():
    img, truth = synthetic_subject()
    seg = grabcut_mask(img, "toy")
    assert seg.method == "grabcut-center" and seg.mask.shape == truth.shape and seg.mask.dtype == bool
    assert iou(seg.mask, truth) > 0.9
    again = grabcut_mask(img, "toy")
    assert np.array_equal(seg.mask, again.mask)  # seeded: reproducible


def test_grabcut_for_people_seeds_with_the_face_grown_to_the_body():
    img, truth = synthetic_subject(h=160, w=120)
    face = (50, 30, 70, 50)
    seg = grabcut_mask(img, "woman", face_detector=lambda rgb: [(1, 1, 4, 4), face])  # the largest face wins
    assert seg.method == "grabcut-face" and seg.box == box_to_body(face, 120, 160)
    none = grabcut_mask(img, "woman", face_detector=lambda rgb: [])
    assert none.method == "grabcut-center" and "no face" in none.note and none.box == central_box(120, 160)
    assert grabcut_mask(img, "dog", face_detector=lambda rgb: [face]).method == "grabcut-center"  # not a person


def test_bundled_face_detector_is_a_callable_or_absent_and_finds_no_face_in_flat_colour():
    detect = haar_face_detector()
    import cv2

    if not hasattr(cv2, "CascadeClassifier"):
        assert detect is None  # OpenCV 5 ships no cascade: the fallback uses a central box
    else:
        assert detect(np.full((120, 120, 3), 128, np.uint8)) == []


def tiny_grounded_sam(folder):
    """Tiny random Grounding DINO + SAM (with processors and a BERT vocab) saved as local folders."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "dog", "cat", "toy"]))
    torch.manual_seed(0)
    gd = GroundingDinoForObjectDetection(
        GroundingDinoConfig(
            backbone_config=SwinConfig(embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=4, image_size=64, out_features=["stage1", "stage2"]),
            text_config=BertConfig(vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=64),
            d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=2,
            encoder_n_points=2, decoder_n_points=2, max_text_len=32,
        )
    )
    with torch.no_grad():  # damp the logits so box scores sit near 0.5, where thresholds can be tested
        gd.model.decoder.layer_norm.weight.mul_(0.01)
    gd_proc = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}), tokenizer=BertTokenizer(str(vocab))
    )
    sam = SamModel(
        SamConfig(
            vision_config=SamVisionConfig(
                hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=64, patch_size=8,
                output_channels=16, window_size=2, global_attn_indexes=[0], num_pos_feats=8, mlp_dim=32,
            ),
            prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
            mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16),
        )
    )
    sam_proc = SamProcessor(image_processor=SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}))
    gd.save_pretrained(folder / "gd")
    gd_proc.save_pretrained(folder / "gd")
    sam.save_pretrained(folder / "sam")
    sam_proc.save_pretrained(folder / "sam")
    return str(folder / "gd"), str(folder / "sam")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return tiny_grounded_sam(tmp_path_factory.mktemp("gsam"))


def test_grounded_sam_end_to_end_on_tiny_random_models(tiny_models):
    gd, sam = tiny_models
    img = Image.fromarray(synthetic_subject(h=80, w=100)[0])
    model = GroundedSam.load(SegmenterConfig(detector=gd, sam=sam, box_threshold=0.0, device="cpu"))
    (x0, y0, x1, y1), score = model.best_box(img, "dog")
    assert 0 <= x0 <= x1 <= 100 and 0 <= y0 <= y1 <= 80 and 0 <= score <= 1
    # the threshold drops every box once it is above the best score
    assert 0.3 < score < 0.8
    strict = GroundedSam.load(SegmenterConfig(detector=gd, sam=sam, box_threshold=score + 1e-3, device="cpu"))
    assert strict.best_box(img, "dog") is None
    assert strict(img, "dog") is None
    # SAM's logits at the image's size, thresholded: a very low threshold keeps all, a very high none
    model.cfg = SegmenterConfig(mask_threshold=-1e9)
    assert model.mask_in_box(img, (x0, y0, x1, y1)).shape == (80, 100) and model.mask_in_box(img, (x0, y0, x1, y1)).all()
    model.cfg = SegmenterConfig(mask_threshold=1e9)
    assert not model.mask_in_box(img, (x0, y0, x1, y1)).any()
    model.cfg = SegmenterConfig(mask_threshold=-1e9, box_threshold=0.0)
    seg = model(img, "dog")
    assert seg.method == "grounded-sam" and seg.mask.shape == (80, 100) and seg.score == pytest.approx(score)


def test_segmenter_falls_back_and_says_so(tiny_models, tmp_path):
    gd, sam = tiny_models
    img, truth = synthetic_subject()
    auto = Segmenter(SegmenterConfig(detector=str(tmp_path / "missing"), sam=sam))
    assert auto.grounded is None and "GrabCut fallback" in auto.status and "missing" in auto.status
    seg = auto(Image.fromarray(img), "toy")
    assert seg.method.startswith("grabcut") and iou(seg.mask, truth) > 0.9
    with pytest.raises(FileNotFoundError, match="--detector"):
        Segmenter(SegmenterConfig(method="grounded-sam", detector=str(tmp_path / "missing"), sam=sam))
    # a class word the detector does not find (no box passes): GrabCut, with a note saying so
    miss = Segmenter(SegmenterConfig(detector=gd, sam=sam, box_threshold=0.9, device="cpu"))
    assert miss.grounded is not None and miss.status.startswith("grounded-sam")
    seg = miss(Image.fromarray(img), "cat")
    assert seg.method.startswith("grabcut") and "found no 'cat'" in seg.note and iou(seg.mask, truth) > 0.9
    with pytest.raises(ValueError, match="--segmenter"):
        Segmenter(SegmenterConfig(method="magic"))


def test_user_masks(tmp_path):
    m = np.zeros((30, 40), np.uint8)
    m[5:20, 10:30] = 255
    Image.fromarray(m).save(tmp_path / "a.png")
    assert np.array_equal(read_user_mask(tmp_path / "a.png", (40, 30)), m > 127)
    with pytest.raises(ValueError, match=r"a\.png.*40x30.*50x30"):
        read_user_mask(tmp_path / "a.png", (50, 30))
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 3][m > 0] = 255  # a cut-out: the alpha channel is the mask
    Image.fromarray(rgba).save(tmp_path / "cut.png")
    assert np.array_equal(read_user_mask(tmp_path / "cut.png", (40, 30)), m > 127)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="empty"):
        read_user_mask(tmp_path / "empty.png", (40, 30))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        read_user_mask(tmp_path / "bad.png", (40, 30))
