import cv2
import numpy as np
import pytest
import torch

from magicme.cli import main
from magicme.face import FaceConfig, face_vcd, feather_mask, restore_faces, smooth_boxes, square_crop
from magicme.faces import FaceFinder, track_faces
from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec
from magicme.video import read_sidecar, read_video, write_video

HAAR = hasattr(cv2, "CascadeClassifier") and hasattr(cv2, "data")


def draw_face(size: int, cx: int, cy: int, r: int, bg: int = 140) -> np.ndarray:
    """A grey cartoon face (dark eyes and brows, light cheeks) that OpenCV's Haar cascade detects; RGB uint8."""
    img = np.full((size, size), bg, np.uint8)
    cv2.ellipse(img, (cx, cy), (int(r * 0.78), r), 0, 0, 360, 190, -1)
    cv2.ellipse(img, (cx, cy - int(r * 0.95)), (int(r * 0.8), int(r * 0.35)), 0, 0, 360, 40, -1)
    for sx in (-1, 1):
        ex, ey = cx + sx * int(r * 0.33), cy - int(r * 0.18)
        cv2.ellipse(img, (ex, ey - int(r * 0.17)), (int(r * 0.2), int(r * 0.05)), 0, 0, 360, 60, -1)
        cv2.ellipse(img, (ex, ey), (int(r * 0.16), int(r * 0.08)), 0, 0, 360, 20, -1)
    cv2.ellipse(img, (cx, cy + int(r * 0.2)), (int(r * 0.1), int(r * 0.06)), 0, 0, 360, 130, -1)
    cv2.ellipse(img, (cx, cy + int(r * 0.5)), (int(r * 0.28), int(r * 0.07)), 0, 0, 360, 80, -1)
    return np.repeat(cv2.GaussianBlur(img, (0, 0), r / 25)[:, :, None], 3, axis=2)


def _smooth_frames(n=4, h=96, w=112, seed=0):
    """Smooth content (resampling round trips stay within rounding)."""
    rng = np.random.default_rng(seed)
    small = rng.random((n, h // 16, w // 16, 3)).astype(np.float32)
    return np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC) for f in small]).clip(0, 1)


def _track(frames, box):
    return track_faces([[box] if i in frames else [] for i in range(max(frames) + 1)])


def test_identity_denoiser_leaves_frames_unchanged():
    frames = _smooth_frames()
    tracks = _track([0, 1, 2], (40.0, 30.0, 24.0, 24.0))
    out = restore_faces(frames, tracks, lambda clip, k: clip, size=64, margin=0.3, feather=0.15, smooth=0)
    x, y, s = square_crop(52, 42, 24, 0.3, 96, 112)
    outside = np.ones(frames.shape[:3], bool)
    outside[:3, y : y + s, x : x + s] = False
    assert np.array_equal(out[outside], frames[outside])  # outside the pasted squares: untouched, bit for bit
    assert np.abs(out - frames).max() < 1.5 / 255  # inside: only resampling rounding
    assert np.array_equal(out[3], frames[3])  # the frame without a face


def test_paste_lands_on_the_face_with_a_feathered_edge():
    frames = np.zeros((2, 96, 112, 3), np.float32)
    tracks = _track([0, 1], (40.0, 30.0, 24.0, 24.0))
    out = restore_faces(frames, tracks, lambda clip, k: np.ones_like(clip), size=64, margin=0.25, feather=0.2, smooth=0)
    x, y, s = square_crop(52, 42, 24, 0.25, 96, 112)
    assert (x, y, s) == (34, 24, 36)
    region = out[0, y : y + s, x : x + s, 0]
    np.testing.assert_allclose(region, feather_mask(s, 0.2), atol=1e-5)  # 1 × mask over 0 = the mask itself
    assert region[s // 2, s // 2] == pytest.approx(1.0) and region[0, 0] < 0.05
    out[:, y : y + s, x : x + s] = 0
    assert not out.any()


def test_boxes_are_smoothed():
    rng = np.random.default_rng(0)
    t = np.arange(40)
    true = np.stack([20 + t * 1.0, 30 + 0 * t, 44 + t * 1.0, 54 + 0 * t], 1)  # x0, y0, x1, y1: 24 px, moving right
    shift = rng.normal(0, 3, (40, 2))
    grow = rng.normal(0, 2, (40, 1))
    jitter = true + np.concatenate([shift, shift], 1) + np.concatenate([0 * grow, 0 * grow, grow, grow], 1)
    smoothed = smooth_boxes(jitter, sigma=2.0)
    raw = smooth_boxes(jitter, sigma=0)
    assert np.abs(np.diff(smoothed, axis=0)).mean() < 0.4 * np.abs(np.diff(raw, axis=0)).mean()  # less jitter
    centre = np.stack([true[:, 0] + 12, true[:, 1] + 12], 1)
    assert np.abs(smoothed[5:-5, :2] - centre[5:-5]).mean() < np.abs(raw[5:-5, :2] - centre[5:-5]).mean()
    still = np.tile([10.0, 10, 30, 40], (6, 1))
    np.testing.assert_allclose(smooth_boxes(still, 3.0), np.tile([20.0, 25, 30], (6, 1)))  # a still face stays put


def test_tracking_links_faces_and_fills_short_gaps():
    a = lambda t: (10.0 + 2 * t, 10.0, 20.0, 20.0)  # noqa: E731 - moves right
    b = (70.0, 60.0, 16.0, 16.0)
    dets = [[a(0), b], [b, a(1)], [], [a(3)], [a(4), b], [], [], [], [], [b]]
    tracks = track_faces(dets, max_gap=2)
    assert [t.frames for t in tracks] == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [9]]  # b: a gap of 4 > 2 starts anew
    corners = lambda x, y, w, h: (x, y, x + w, y + h)  # noqa: E731 - the detector's (x, y, w, h) → x0, y0, x1, y1
    np.testing.assert_allclose(tracks[0].boxes[2], corners(*a(2)))  # missed frames are interpolated
    np.testing.assert_allclose(tracks[1].boxes[2:4], [corners(*b), corners(*b)])
    assert tracks[0].seen.tolist() == [True, True, False, True, True]


def test_face_vcd_without_faces_returns_the_clip_unchanged(tmp_path, caplog):
    frames = (np.random.default_rng(0).random((3, 64, 64, 3)) * 255).astype(np.uint8)
    video = write_video(frames, tmp_path / "in")  # PNG frames: lossless
    with caplog.at_level("WARNING"):
        out = face_vcd(FaceConfig(prompt="a dog"), video, tmp_path / "out", detector=lambda f: [])
    assert "no face" in caplog.text
    assert np.array_equal(read_video(out), frames) and read_sidecar(out)["faces"] == 0


def test_face_vcd_end_to_end_with_identity(tmp_path):
    frames = np.stack([draw_face(96, 40 + 2 * i, 48, 20) for i in range(4)])
    video = write_video(frames, tmp_path / "in.gif")
    ident = save_identity(tmp_path / "id.safetensors", torch.randn(3, 32),
                          IdentityInfo(token="<v*>", class_word="person", num_vectors=3, hidden_size=32))
    boxes = {0: (20.0, 28.0, 40.0, 40.0), 1: (22.0, 28.0, 40.0, 40.0), 3: (26.0, 28.0, 40.0, 40.0)}
    calls = iter(range(4))

    def detector(frame):  # misses the face in frame 2
        i = next(calls)
        return [boxes[i]] if i in boxes else []

    cfg = FaceConfig(prompt="a photo of <v*> person", identities=[str(ident)], steps=5, models=ModelSpec(base="tiny"))
    out = face_vcd(cfg, video, tmp_path / "out", detector=detector, quiet=True, device="cpu")
    result = read_video(out)
    assert result.shape == frames.shape and not np.array_equal(result, frames)
    rec = read_sidecar(out)
    assert rec["faces"] == 1 and rec["face_frames"] == [0, 1, 2, 3] and rec["strength"] == 0.8
    assert rec["tracks"][0]["boxes"] == [[20.0, 28.0, 60.0, 68.0], [22.0, 28.0, 62.0, 68.0], None, [26.0, 28.0, 66.0, 68.0]]
    assert np.array_equal(result[0, :, 80:], frames[0, :, 80:])  # right of the face square (≈ x 10…74): untouched


@pytest.mark.skipif(not HAAR, reason=f"OpenCV {cv2.__version__} has no Haar cascade (moved to contrib in 5.0)")
def test_haar_detector_finds_a_drawn_face():
    faces = FaceFinder("haar")(draw_face(128, 64, 64, 32))
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert abs((x0 + x1) / 2 - 64) < 8 and abs((y0 + y1) / 2 - 64) < 12 and faces[0].score > 0


@pytest.mark.parametrize(
    "change, needle",
    [(dict(strength=0), "--strength"), (dict(feather=0.9), "--feather"), (dict(detector="nope.onnx"), "--detector"),
     (dict(face_size=100), "--face-size"), (dict(steps=1), "--steps"), (dict(detector="dlib"), "--detector"),
     (dict(min_track=0), "--min-track"), (dict(min_face=1), "--min-face")],
)
def test_bad_settings(tmp_path, change, needle):
    video = write_video(np.zeros((2, 32, 32, 3), np.uint8), tmp_path / "in.gif")
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        face_vcd(FaceConfig(prompt="a dog", **change), video, tmp_path / "out.gif", detector=lambda f: [])
    assert not (tmp_path / "out.gif").exists()


def test_face_cli_end_to_end(tmp_path, capsys):
    """With OpenCV 4's Haar cascade: a drawn face found and re-rendered; without it: a one-line error, nothing written."""
    frames = np.stack([draw_face(128, 60 + i, 64, 32) for i in range(3)])
    video = write_video(frames, tmp_path / "in")
    ident = save_identity(tmp_path / "id.safetensors", torch.randn(2, 32),
                          IdentityInfo(token="<v*>", class_word="person", num_vectors=2, hidden_size=32))
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    code = main(["face", "--video", str(video), "--identity", str(ident), "--prompt", "a <v*> person", "--steps", "4",
                 "--detector", "haar", "--out", str(out), "--quiet"])
    cap = capsys.readouterr()
    if not HAAR:
        assert code == 2 and "Haar" in cap.err and len(cap.err.strip().splitlines()) == 1
        assert set(tmp_path.iterdir()) == before
        return
    assert code == 0 and str(out) in cap.out
    rec = read_sidecar(out)
    assert rec["faces"] == 1 and rec["face_frames"] == [0, 1, 2]
    result = read_video(out)
    assert result.shape == frames.shape and not np.array_equal(result[:, 40:90, 40:90], frames[:, 40:90, 40:90])
    assert np.array_equal(result[:, :, :8], frames[:, :, :8])  # far from the face: untouched


def test_unreadable_yunet_model_is_a_clear_error(tmp_path):
    (tmp_path / "face_detection_yunet.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="--detector .* not a YuNet"):
        FaceFinder(str(tmp_path / "face_detection_yunet.onnx"))
