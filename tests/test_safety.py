"""Nothing lost, nothing half-written, one clear line for bad input (issue 11: data loss and bad input).

- the data-loss cases of the issue, each reproduced (every one of them lost files before);
- folder replacement killed at every step (a real SIGKILL in a child process): the old or the new, never
  a mix, and the next run cleans the leftovers;
- a fuzz-style table of bad inputs over every sub-command, run in-process: exit 2, exactly one line on
  stderr naming the input, and the whole working tree byte for byte as before.
"""

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from magicme import outputs
from magicme.cli import main
from magicme.identity import IdentityInfo, read_identity, read_identity_info, save_identity
from magicme.outputs import atomic_folder, check_not_input, check_output, clean_leftovers, leftovers
from magicme.prepare import CLOSE_WORDS, FAR_WORDS, PrepareConfig, load_reference_images, prepare_identity_set
from magicme.segment import SegmenterConfig, grabcut_mask
from magicme.train import TEMPLATES
from magicme.video import MAX_DECODE_PIXELS, open_image, read_video, write_video

WORDS = (*FAR_WORDS, *CLOSE_WORDS)

SRC = str(Path(__file__).parents[1] / "src")
GRABCUT = SegmenterConfig(method="grabcut")


# ---- helpers ------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `root`, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = None if p.is_dir() and not p.is_symlink() else (os.readlink(p) if p.is_symlink() else p.read_bytes())
    return out


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width × height greyscale pixels, in a few hundred bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                     + chunk(b"IEND", b""))
    return path


def photo(path: Path, size=(64, 64), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    img = np.full((*size[::-1], 3), rng.integers(40, 120, 3), np.uint8)
    h, w = size[1], size[0]
    img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = (230, 90, 30)
    Image.fromarray(img).save(path)
    return path


def identity(path: Path, values=None, **meta) -> Path:
    info = IdentityInfo(token="<v*>", class_word="toy", num_vectors=2, hidden_size=32)
    emb = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) if values is None else values
    save_identity(path, emb, info)
    if meta:  # rewrite the metadata as a careless or hostile tool would
        from safetensors.torch import load_file, save_file

        save_file(load_file(str(path)), str(path), metadata={**info.metadata(), **meta})
    return path


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    """A folder nobody may write in: a chmod 555 one, or (root ignores permission bits) /sys."""
    if os.geteuid() != 0:
        ro = tmp_path_factory.mktemp("ro")
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    try:
        (Path("/sys") / "magicme-probe").touch()
    except OSError:
        yield Path("/sys")
        return
    pytest.skip("no read-only folder available")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A working folder with everything the commands read, and a user's own files beside it."""
    w = tmp_path_factory.mktemp("world")
    (w / "photos").mkdir()
    for i in range(2):
        photo(w / "photos" / f"p{i}.png", seed=i)
    prepare_identity_set(PrepareConfig(images=w / "photos", class_word="toy", out=w / "prepared", resolution=64, segmenter=GRABCUT))
    identity(w / "id.safetensors")
    identity(w / "nan.safetensors", torch.full((2, 32), float("nan")))
    identity(w / "lying.safetensors", num_vectors="5")
    clip = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    write_video(clip, w / "clip.gif", record={"task": "test"})
    write_video(clip[:4], w / "frames_in")
    mp4 = write_video(clip, w / "full.mp4").read_bytes()
    (w / "truncated.mp4").write_bytes(mp4[: len(mp4) // 2])
    (w / "garbage.mp4").write_bytes(b"this is not a video")
    os.symlink("clip.gif", w / "link.gif")
    (w / "docs").mkdir()  # a user's folder
    (w / "docs" / "thesis.txt").write_text("years of work")
    (w / "docs" / "movie.mp4").write_bytes(b"the user's own movie")
    (w / "docs" / "notmine.safetensors").write_bytes(b"the user's own weights")
    (w / "plainfile").write_text("a file where a folder is meant")
    (w / "userwork").mkdir()
    (w / "userwork" / "t2v_s0.mp4").write_bytes(b"a user's clip that happens to be named like ours")
    for name, maker in (("bombs", lambda d: bomb_png(d / "bomb.png", 100_000, 100_000)),
                        ("big", lambda d: bomb_png(d / "big.png", 12_000, 12_000)),
                        ("tiny", lambda d: Image.new("RGB", (1, 1)).save(d / "dot.png")),
                        ("corrupt", lambda d: (d / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"))):
        (w / name).mkdir()
        maker(w / name)
    (w / "bad_manifest").mkdir()
    (w / "bad_manifest" / "manifest.json").write_text(json.dumps(
        {"format": "magicme.identity-set/1", "class_word": "toy", "items": [{"image": "../../etc/passwd", "mask": "masks/a.png"}]}))
    ckpt = w / "id-checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": "one"')
    (ckpt / "state.safetensors").write_bytes(b"garbage")
    (w / "user.jsonl").write_text('{"my": "notes"}\nnot even json\n')
    (w / "mine.jsonl.lock").write_text("a user's file that happens to end in .lock\n")
    subjects = {"seeds": [0], "frames": 2, "steps": 1, "subjects": [
        {"name": "toy", "identity": "id.safetensors", "references": "photos", "prompts": ["a <v*> toy"]}]}
    (w / "subjects.yaml").write_text(yaml.safe_dump(subjects))
    (w / "seeds_abc.yaml").write_text(yaml.safe_dump({**subjects, "seeds": "abc"}))
    (w / "frames_many.yaml").write_text(yaml.safe_dump({**subjects, "frames": "many"}))
    escape = json.loads(json.dumps(subjects))
    escape["subjects"][0]["name"] = "../../x"
    (w / "escape.yaml").write_text(yaml.safe_dump(escape))
    run = {"images": "photos", "class_word": "toy", "prompt": "a <v*> toy", "work_dir": "runwork",
           "models": {"base": "tiny"}, "prepare": {"resolution": 64, "segmenter": {"method": "grabcut"}},
           "train": {"steps": 1, "batch_size": 1, "checkpoint_every": 0}, "generate": {"frames": 2, "steps": 1},
           "face": False, "upscale": False, "evaluate": False}
    (w / "run.yaml").write_text(yaml.safe_dump(run))
    bad_runs = {
        "r_steps": {"train": {"steps": "abc"}}, "r_seed": {"seed": "abc"}, "r_seed_big": {"seed": 2**40},
        "r_guidance": {"generate": {"guidance": float("inf")}}, "r_gamma": {"gamma": float("nan")},
        "r_vectors": {"train": {"num_vectors": 1_000_000}}, "r_batch": {"train": {"batch_size": "1e8"}},
        "r_base": {"models": {"base": 5}}, "r_resolution": {"prepare": {"resolution": 12.5}},
        "r_frames": {"generate": {"frames": [16]}}, "r_masked": {"train": {"masked": "yes"}},
        "r_lr": {"train": {"lr": "fast"}}, "r_face": {"face": {"margin": "wide"}},
        "r_height": {"generate": {"height": 1_000_000}}, "r_prompt": {"prompt": ["a <v*> toy"]},
        "r_images_in_out": {"images": "prepared/images", "work_dir": "."},
    }
    for name, change in bad_runs.items():
        (w / f"{name}.yaml").write_text(yaml.safe_dump({**run, **change}))
    return w


# ---- the data-loss cases of the issue -----------------------------------------------------------


def test_loss_1_generate_out_dot_dotdot_or_a_users_folder_deletes_nothing(world, capsys, monkeypatch):
    monkeypatch.chdir(world / "docs")
    before = snapshot(world)
    for out in (".", "..", str(world / "docs"), "../docs"):
        code, cap = run_cli(["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--out", out, "--quiet"], capsys)
        assert code == 2 and len(cap.err.strip().splitlines()) == 1, (out, cap.err)
    for cmd in ("v2v", "face", "upscale"):
        code, cap = run_cli([cmd, "--video", world / "clip.gif", "--prompt", "a dog", "--out", world / "docs"], capsys)
        assert code == 2 and "docs" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert snapshot(world) == before


def test_loss_2_output_equal_to_the_input_clip_is_refused(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    before = snapshot(world)
    for cmd in ("v2v", "face", "upscale"):
        for out in ("clip.gif", "./docs/../clip.gif", str(world / "clip.gif"), "link.gif"):
            code, cap = run_cli([cmd, "--video", "clip.gif", "--prompt", "a dog", "--out", out], capsys)
            assert code == 2 and "is the input --video" in cap.err, (cmd, out, cap.err)
        code, cap = run_cli([cmd, "--video", "link.gif", "--prompt", "a dog", "--out", "clip.gif"], capsys)
        assert code == 2 and "is the input --video" in cap.err  # through the symlink
    assert snapshot(world) == before


def test_loss_3_a_results_file_the_suite_did_not_write_keeps_its_lines(world, capsys, monkeypatch):
    monkeypatch.chdir(world)
    before = snapshot(world)
    code, cap = run_cli(["evaluate-suite", "--subjects", "subjects.yaml", "--results", "user.jsonl", "--device", "cpu"], capsys)
    assert code == 2 and "not a magicme results file" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert snapshot(world) == before


def test_loss_4_prepare_out_holding_the_photos_keeps_them(tmp_path, capsys):
    x = tmp_path / "X"
    (x / "images").mkdir(parents=True)
    for i in range(2):
        photo(x / "images" / f"p{i}.png", seed=i)
    before = snapshot(tmp_path)
    for images, out in ((x / "images", x), (x / "images", x / "images"), (x / "images", x / "images" / "prep")):
        code, cap = run_cli(["prepare", "--images", images, "--class-word", "toy", "--out", out, "--segmenter", "grabcut"], capsys)
        assert code == 2 and "--out" in cap.err and len(cap.err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before
    # a prepared folder used as the photos of the next: its images are inside the output being replaced
    prepare_identity_set(PrepareConfig(images=x / "images", class_word="toy", out=tmp_path / "P", resolution=64, segmenter=GRABCUT))
    before = snapshot(tmp_path)
    code, cap = run_cli(["prepare", "--images", tmp_path / "P" / "images", "--class-word", "toy", "--out", tmp_path / "P"], capsys)
    assert code == 2 and "holds the input --images" in cap.err
    assert snapshot(tmp_path) == before


def test_a_commands_own_outputs_are_replaced(tmp_path, capsys):
    """The other side of the rule: a rerun replaces what magicme wrote (its run record or manifest says so)."""
    args = ["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--quiet", "--out"]
    for out in (tmp_path / "frames", tmp_path / "a.gif"):
        assert run_cli([*args, out], capsys)[0] == 0
        first = snapshot(tmp_path)
        assert run_cli([*args, out, "--seed", "3"], capsys)[0] == 0
        assert snapshot(tmp_path) != first and json.loads(Path(f"{out}.json").read_text())["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    photos = tmp_path / "photos"
    photos.mkdir()
    photo(photos / "a.png")
    cfg = PrepareConfig(images=photos, class_word="toy", out=tmp_path / "prep", resolution=64, segmenter=GRABCUT)
    prepare_identity_set(cfg)
    prepare_identity_set(cfg)  # its own folder: replaced
    (tmp_path / "prep" / "my-notes.txt").write_text("added by the user")
    with pytest.raises(FileExistsError, match="did not write"):
        prepare_identity_set(cfg)  # a file magicme did not write would be lost: refused
    assert (tmp_path / "prep" / "my-notes.txt").read_text() == "added by the user"


# ---- kills and failures in the middle of a folder replacement ----------------------------------

KILL_AT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from magicme import outputs

    step, dest = sys.argv[1], Path(sys.argv[2])
    calls = {"replace": 0}
    real_replace, real_remove = os.replace, outputs._remove

    def replace(a, b):
        calls["replace"] += 1
        if step == f"replace{calls['replace']}":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(a, b)

    def remove(p):
        if step == "remove":
            os.kill(os.getpid(), signal.SIGKILL)
        real_remove(p)

    outputs.os.replace, outputs._remove = replace, remove
    with outputs.atomic_folder(dest) as tmp:
        for i in range(3):
            (tmp / f"{i}.txt").write_text("new")
            if step == "filling" and i == 1:
                os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("step", ["filling", "replace1", "replace2", "remove"])
def test_folder_replacement_killed_at_every_step_leaves_old_or_new(tmp_path, step):
    dest = tmp_path / "out"
    dest.mkdir()
    for i in range(3):
        (dest / f"{i}.txt").write_text("old")
    old = snapshot(dest)
    proc = subprocess.run([sys.executable, "-c", KILL_AT, step, str(dest)], env={**os.environ, "PYTHONPATH": SRC})
    assert proc.returncode == -9  # really killed
    assert leftovers(dest)  # the killed run left its hidden folder(s)
    clean_leftovers(dest)  # what the next write of `dest` does first
    assert not leftovers(dest) and [p.name for p in tmp_path.iterdir()] == ["out"]
    now = snapshot(dest)
    new = {f"{i}.txt": b"new" for i in range(3)}
    assert now == (new if step == "remove" else old)  # old or new, never a mix
    with atomic_folder(dest) as tmp:  # and the next run replaces it normally
        (tmp / "x.txt").write_text("next")
    assert snapshot(dest) == {"x.txt": b"next"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failures_inside_a_replacement_keep_the_old_folder(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    write_video(np.zeros((2, 8, 8, 3), np.uint8), dest)
    old = snapshot(dest)
    with pytest.raises(RuntimeError):
        with atomic_folder(dest) as tmp:
            (tmp / "00000.png").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert snapshot(dest) == old and [p.name for p in tmp_path.iterdir()] == ["out"]
    real = os.replace
    calls = []

    def second_fails(a, b):  # the new folder cannot be renamed in after the old one went aside
        calls.append(b)
        if len(calls) == 2:
            raise OSError("rename failed")
        real(a, b)

    monkeypatch.setattr(outputs.os, "replace", second_fails)
    with pytest.raises(OSError):
        write_video(np.ones((2, 8, 8, 3), np.uint8), dest)
    monkeypatch.undo()
    assert snapshot(dest) == old and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_killed_writes_are_cleaned_on_the_next_write_of_that_output(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f".magicme-tmp.{dead.pid}.0123abcd.clip.mp4", f".magicme-old.{dead.pid}.89abcdef.frames"):
        (tmp_path / name).mkdir() if "frames" in name else (tmp_path / name).write_bytes(b"x")
    live = tmp_path / f".magicme-tmp.{os.getpid()}.0123abcd.clip.mp4"  # a write under way in this process
    live.write_bytes(b"x")
    mine = tmp_path / ".clip.mp4.user-file"  # not ours: never touched
    mine.write_bytes(b"x")
    write_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "clip.mp4")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["clip.mp4", live.name, mine.name, f".magicme-old.{dead.pid}.89abcdef.frames"])
    write_video(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "frames")  # the old folder whose swap was cut: put back, then replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["clip.mp4", "frames", live.name, mine.name])


def test_a_kill_between_a_video_and_its_record_leaves_it_ours_and_no_wrong_record(tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.gif"
    args = ["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--quiet", "--out", out]
    assert run_cli(args, capsys)[0] == 0
    import magicme.video

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands for a kill after the clip was replaced, before its record
    monkeypatch.setattr(magicme.video, "write_sidecar", killed)
    assert run_cli([*args, "--seed", "5"], capsys)[0] == 130
    assert not Path(f"{out}.json").exists()  # the old record (seed 0) does not describe the new clip
    monkeypatch.undo()
    assert run_cli([*args, "--seed", "5"], capsys)[0] == 0  # still magicme's own: replaced
    assert json.loads(Path(f"{out}.json").read_text())["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.gif.json"]


# ---- outputs, inputs and paths ------------------------------------------------------------------


def test_output_against_inputs_by_resolved_path_symlink_and_hard_link(tmp_path):
    (tmp_path / "in").mkdir()
    clip = tmp_path / "in" / "clip.mp4"
    clip.write_bytes(b"x")
    os.link(clip, tmp_path / "hard.mp4")
    os.symlink(tmp_path / "in", tmp_path / "alias")
    for out, words in ((tmp_path / "alias" / "clip.mp4", "is the input"), (tmp_path / "hard.mp4", "is the input"),
                       (tmp_path / "alias", "holds the input"), (tmp_path / "in" / "sub", "lies inside the input")):
        with pytest.raises(ValueError, match=words):
            check_not_input(out, [("--video", clip if "inside" not in words else tmp_path / "in")])
    check_not_input(tmp_path / "other.mp4", [("--video", clip)])


def test_file_where_a_folder_is_meant_and_back(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(FileExistsError, match="is a file, but a folder"):
        check_output(tmp_path / "f", folder=True)
    with pytest.raises(FileExistsError, match="is a folder, but a file"):
        check_output(tmp_path / "d.mp4")
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", folder=True) == tmp_path / "empty"  # nothing in it to lose


# ---- images -------------------------------------------------------------------------------------


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    for w, h in ((100_000, 100_000), (12_000, 12_000)):
        path = bomb_png(tmp_path / f"b{w}.png", w, h)
        with pytest.raises(ValueError, match=f"b{w}.png.*(pixel|bomb)"):
            open_image(path, "--images: photo")
    assert 12_000 * 12_000 > MAX_DECODE_PIXELS


def test_a_10000_square_greyscale_photo_loads_downscaled_in_bounded_memory(tmp_path):
    folder = tmp_path / "huge"
    folder.mkdir()
    img = Image.linear_gradient("L").resize((10_000, 10_000))
    img.save(folder / "huge.png", compress_level=1)
    del img
    code = ("import resource, sys; from magicme.prepare import load_reference_images, load_side;"
            f"[(p, im)] = load_reference_images({str(folder)!r}, load_side(512));"
            "print(im.size, im.mode, im.info['source_size'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert out.returncode == 0, out.stderr
    size, mode, source, peak_kb = out.stdout.rsplit(" ", 1)[0], None, None, int(out.stdout.split()[-1])
    assert size.startswith("(2048, 2048) RGB (10000, 10000)")
    assert peak_kb < 1_000_000  # under 1 GB (decoding 10000² greyscale alone is 100 MB)


def test_tiny_photos_are_skipped_or_refused_and_grabcut_never_asserts(tmp_path, caplog):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ValueError, match=r"dot\.png.*1×1.*16×16"):
        load_reference_images(tmp_path)
    photo(tmp_path / "ok.png")
    assert [p.name for p, _ in load_reference_images(tmp_path)] == ["ok.png"] and "dot.png" in caplog.text
    for shape in ((1, 1, 3), (2, 40, 3), (40, 1, 3)):
        with pytest.raises(ValueError, match="too small for GrabCut"):
            grabcut_mask(np.zeros(shape, np.uint8), "dog")
    assert grabcut_mask(np.random.default_rng(0).integers(0, 255, (3, 3, 3), dtype=np.uint8), "dog").mask.shape == (3, 3)


def test_huge_photo_with_a_user_mask_is_downscaled_together(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "masks").mkdir()
    photo(tmp_path / "img" / "a.png", size=(3000, 1500))
    mask = np.zeros((1500, 3000), np.uint8)
    mask[400:1100, 1000:2000] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    cfg = PrepareConfig(images=tmp_path / "img", class_word="toy", out=tmp_path / "p", masks=tmp_path / "masks", resolution=64)
    item = json.loads((prepare_identity_set(cfg) / "manifest.json").read_text())["items"][0]
    assert item["source_size"] == [3000, 1500] and item["working_size"] == [2048, 1024]
    assert item["mask_area"] == pytest.approx(1000 * 700 / 1500**2, abs=0.01)  # the user's mask, in the square crop


def test_truncated_and_undecodable_clips_are_one_line(world):
    with pytest.raises(ValueError, match=r"truncated: \d+ of its 16 frames") as e:
        read_video(world / "truncated.mp4")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="cannot be decoded") as e:
        read_video(world / "garbage.mp4")
    assert "\n" not in str(e.value) and "ffmpeg version" not in str(e.value)


# ---- identities ---------------------------------------------------------------------------------


def test_identity_vectors_must_be_finite_and_as_many_as_claimed(world):
    with pytest.raises(ValueError, match="NaN/inf"):
        read_identity(world / "nan.safetensors")
    with pytest.raises(ValueError, match="claims 5 vectors.*\\[2, 32\\]"):
        read_identity_info(world / "lying.safetensors")
    assert read_identity(world / "id.safetensors")[0].shape == (2, 32)


def test_num_vectors_must_fit_the_77_token_prompt():
    from magicme.tokenizer import tiny_clip_tokenizer
    from magicme.train import IdTokens, TrainConfig, max_num_vectors

    tok = tiny_clip_tokenizer()
    limit = max_num_vectors(tok, "teddy bear")
    longest = max(len(tok(f"{t.format('teddy bear')}, {w}").input_ids) for t in TEMPLATES for w in WORDS)
    assert limit == 77 - longest and 50 < limit < 74
    with pytest.raises(ValueError, match=f"at most {limit} ID tokens"):
        IdTokens(tok, None, "<v*>", limit + 1, "teddy bear")  # refused before the text encoder is touched
    with pytest.raises(ValueError, match=r"--num-vectors must be an integer in \[1, 74\]"):
        TrainConfig(data="x", num_vectors=1_000_000).check_settings()


def test_malformed_checkpoints_are_one_error_naming_them(tmp_path):
    from safetensors.torch import save_file

    from magicme.train import read_checkpoint

    ok = {"step": 2, "identity": IdentityInfo("<v*>", "toy", 2, hidden_size=32).metadata(), "base": {}, "settings": {}}
    cases = {
        "not-json": ("{", {"id_embeddings": torch.zeros(2, 32)}, "malformed"),
        "no-step": (json.dumps({**ok, "step": None}), {"id_embeddings": torch.zeros(2, 32)}, "'step'"),
        "bad-meta": (json.dumps({**ok, "identity": {**ok["identity"], "num_vectors": "many"}}), {"id_embeddings": torch.zeros(2, 32)}, "malformed"),
        "nan": (json.dumps(ok), {"id_embeddings": torch.full((2, 32), float("nan"))}, "NaN"),
        "short": (json.dumps(ok), {"id_embeddings": torch.zeros(1, 32)}, "no ID vectors matching"),
        "garbage": (json.dumps(ok), None, "not readable"),
    }
    for name, (record, tensors, needle) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "state.json").write_text(record)
        if tensors is None:
            (folder / "state.safetensors").write_bytes(b"garbage")
        else:
            save_file(tensors, str(folder / "state.safetensors"))
        with pytest.raises(ValueError, match=needle) as e:
            read_checkpoint(folder)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_config_tables_are_checked_by_their_dataclass_types():
    import typing

    from magicme.generate import GenerateConfig
    from magicme.records import build_config, check_value
    from magicme.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    assert check_value("1e-3", hints["lr"], "train.lr") == 0.001  # PyYAML reads 1e-3 as a string
    assert check_value({"zoom": [1.2, 1.3]}, hints["augment"], "train.augment").zoom == (1.2, 1.3)
    for key, value, words in (("steps", "abc", "steps must be an integer"), ("lr", float("inf"), "lr must be a finite number"),
                              ("lr", float("nan"), "lr must be a finite number"), ("masked", 1, "masked must be true or false"),
                              ("augment", {"zoom": [1]}, "a list of 2 values"), ("micro_batch", 2.5, "an integer or null")):
        with pytest.raises(ValueError, match=words):
            check_value(value, hints[key], f"train.{key}")
    with pytest.raises(ValueError, match="does not take"):
        build_config(TrainConfig, {"colour": "red"}, "train")
    with pytest.raises(ValueError, match=r"prompt_at key must be an integer"):
        check_value({"soon": "a dog"}, typing.get_type_hints(GenerateConfig)["prompt_at"], "generate.prompt_at")


def test_devices_that_are_not_here_are_refused():
    from magicme.models import pick_device

    assert pick_device("cpu").type == "cpu" and pick_device(None).type in ("cpu", "cuda")
    for name in ("cuda:99", "toaster", "meta"):
        with pytest.raises(ValueError, match="--device"):
            pick_device(name)


# ---- the table: every sub-command, bad input → exit 2, one line naming it, nothing changed ------

GEN = ["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--quiet"]
GEN_ID = ["generate", "--prompt", "a <v*> toy", "--frames", "2", "--steps", "1", "--quiet"]
V2V = ["--video", "clip.gif", "--prompt", "a dog", "--steps", "10"]
PREP = ["prepare", "--class-word", "toy", "--segmenter", "grabcut"]
TRAIN = ["train", "--data", "prepared", "--steps", "1", "--quiet"]
EVAL = ["evaluate", "--video", "clip.gif", "--prompt", "a toy", "--references", "photos"]
SUITE = ["evaluate-suite", "--subjects", "subjects.yaml", "--results", "r.jsonl", "--quiet"]

CASES = [
    # generate
    (GEN + ["--out", "."], "current folder"),
    (GEN + ["--out", ".."], "current folder"),
    (GEN + ["--out", "docs"], "'docs' exists and magicme did not write it"),
    (GEN + ["--out", "docs/movie.mp4"], "movie.mp4"),
    (GEN + ["--out", "plainfile"], "is a file, but a folder"),
    (GEN + ["--out", "{ro}/x.mp4"], "not writable"),
    (GEN + ["--out", "nowhere/x.mp4"], "does not exist"),
    (GEN + ["--guidance", "inf"], "--guidance"),
    (GEN + ["--guidance", "nan"], "--guidance"),
    (GEN + ["--gamma", "nan"], "--gamma"),
    (GEN + ["--frames", "abc"], "--frames"),
    (GEN + ["--frames", "2.5"], "--frames"),
    (GEN + ["--seed", "-1"], "--seed"),
    (GEN + ["--seed", "99999999999999999999"], "--seed"),
    (GEN + ["--frames", "100000"], "limit"),
    (GEN + ["--height", "1000000"], "limit"),
    (GEN_ID + ["--identity", "nan.safetensors", "--out", "o.gif"], "nan.safetensors"),
    (GEN_ID + ["--identity", "lying.safetensors", "--out", "o.gif"], "lying.safetensors"),
    (GEN + ["--identity", "missing.safetensors"], "missing.safetensors"),
    (GEN + ["--device", "cuda:99"], "--device"),
    (GEN + ["--device", "toaster"], "--device"),
    (GEN + ["--frames"], "--frames"),
    # prepare
    (PREP + ["--images", "photos", "--out", "photos"], "is the input --images"),
    (PREP + ["--images", "photos", "--out", "photos/prep"], "inside the input --images"),
    (PREP + ["--images", "prepared/images", "--out", "prepared"], "holds the input --images"),
    (PREP + ["--images", "bombs", "--out", "new"], "bomb.png"),
    (PREP + ["--images", "big", "--out", "new"], "big.png"),
    (PREP + ["--images", "tiny", "--out", "new"], "dot.png"),
    (PREP + ["--images", "corrupt", "--out", "new"], "c.png"),
    (PREP + ["--images", "photos", "--out", "docs"], "did not write"),
    (PREP + ["--images", "photos", "--out", "plainfile"], "is a file"),
    (PREP + ["--images", "photos", "--out", "{ro}/prep"], "not writable"),
    (PREP + ["--images", "photos", "--out", "new", "--resolution", "abc"], "--resolution"),
    (PREP + ["--images", "photos", "--out", "new", "--resolution", "1000000"], "--resolution"),
    (PREP + ["--images", "photos", "--out", "new", "--box-threshold", "nan"], "--box-threshold"),
    (PREP + ["--images", "photos", "--out", "new", "--device", "cuda:99"], "--device"),
    # train
    (TRAIN + ["--num-vectors", "1000000"], "--num-vectors"),
    (TRAIN + ["--batch-size", "100000000"], "--batch-size"),
    (TRAIN + ["--batch-size", "1e8"], "--batch-size"),
    (TRAIN + ["--lr", "inf"], "--lr"),
    (TRAIN + ["--lr", "nan"], "--lr"),
    (TRAIN + ["--seed", "-5"], "--seed"),
    (TRAIN + ["--out", "docs/notmine.safetensors"], "did not write"),
    (TRAIN + ["--out", "prepared/x.safetensors"], "inside the input --data"),
    (TRAIN + ["--out", "{ro}/id.safetensors"], "not writable"),
    (TRAIN + ["--out", "docs"], "must end in .safetensors"),
    (["train", "--data", "bad_manifest", "--out", "x.safetensors"], "bad_manifest"),
    (["train", "--data", "nowhere", "--out", "x.safetensors"], "nowhere"),
    (TRAIN + ["--out", "id2.safetensors", "--resume", "id-checkpoints/step-000001"], "--resume"),
    (TRAIN + ["--device", "cuda:99"], "--device"),
    # v2v, face, upscale
    *[(cmd + V2V + extra, needle) for cmd in (["v2v"], ["face"], ["upscale"]) for extra, needle in (
        (["--out", "clip.gif"], "is the input --video"),
        (["--out", "docs"], "did not write"),
        (["--out", "{ro}/x.mp4"], "not writable"),
        (["--strength", "nan"], "--strength"),
        (["--guidance", "inf"], "--guidance"),
        (["--seed", "4294967296"], "--seed"),
        (["--device", "cuda:99"], "--device"),
    )],
    (["v2v", "--video", "truncated.mp4", "--prompt", "a dog", "--out", "o.mp4"], "truncated"),
    (["v2v", "--video", "garbage.mp4", "--prompt", "a dog", "--out", "o.mp4"], "garbage.mp4"),
    (["v2v", "--video", "bombs", "--prompt", "a dog", "--out", "o.mp4"], "bomb.png"),
    (["v2v", "--video", "frames_in", "--prompt", "a dog", "--out", "frames_in/o.mp4"], "inside the input --video"),
    (["v2v", "--video", "link.gif", "--prompt", "a dog", "--out", "clip.gif"], "is the input --video"),
    (["face"] + V2V + ["--out", "o.mp4", "--margin", "inf"], "--margin"),
    (["face"] + V2V + ["--out", "o.mp4", "--face-size", "100000"], "--face-size"),
    (["upscale"] + V2V + ["--out", "o.mp4", "--controlnet-scale", "nan"], "--controlnet-scale"),
    (["upscale", "--video", "truncated.mp4", "--prompt", "a dog", "--out", "o.mp4"], "truncated"),
    # evaluate
    (EVAL[:-1] + ["corrupt"], "c.png"),
    (EVAL[:-1] + ["bombs"], "bomb.png"),
    (EVAL[:-1] + ["tiny", "--batch-size", "abc"], "--batch-size"),
    (["evaluate", "--video", "truncated.mp4", "--prompt", "a toy", "--references", "photos"], "truncated"),
    (EVAL + ["--device", "cuda:99"], "--device"),
    # evaluate-suite
    (SUITE[:3] + ["--results", "user.jsonl"], "user.jsonl"),
    (["evaluate-suite", "--subjects", "seeds_abc.yaml", "--results", "r.jsonl"], "seeds"),
    (["evaluate-suite", "--subjects", "frames_many.yaml", "--results", "r.jsonl"], "frames"),
    (["evaluate-suite", "--subjects", "escape.yaml", "--results", "r.jsonl"], "../../x"),
    (["evaluate-suite", "--subjects", "subjects.yaml", "--results", "mine.jsonl"], "mine.jsonl.lock"),
    (SUITE[:3] + ["--results", "subjects.yaml"], ".jsonl"),
    (SUITE[:3] + ["--results", "{ro}/r.jsonl"], "not writable"),
    (SUITE + ["--gamma", "inf"], "--gamma"),
    (SUITE + ["--seed", "-3"], "--seed"),
    (SUITE + ["--videos", "plainfile"], "is a file"),
    (SUITE + ["--device", "cuda:99"], "--device"),
    # report
    (["report", "--results", "user.jsonl", "--out", "rep"], "user.jsonl"),
    (["report", "--results", "nope.jsonl", "--out", "rep"], "nope.jsonl"),
    (["report", "--results", "user.jsonl", "--out", "rep", "--max-videos", "x"], "--max-videos"),
    # run
    *[(["run", "--config", f"{name}.yaml"], needle) for name, needle in (
        ("r_steps", "steps"), ("r_seed", "seed"), ("r_seed_big", "seed"), ("r_guidance", "guidance"),
        ("r_gamma", "gamma"), ("r_vectors", "--num-vectors"), ("r_batch", "batch_size"), ("r_base", "base"),
        ("r_resolution", "resolution"), ("r_frames", "frames"), ("r_masked", "masked"), ("r_lr", "lr"),
        ("r_face", "margin"), ("r_height", "limit"), ("r_prompt", "prompt"), ("r_images_in_out", "images"),
    )],
    (["run", "--config", "run.yaml", "--work-dir", "userwork"], "t2v_s0.mp4"),
    (["run", "--config", "run.yaml", "--work-dir", "plainfile"], "is a file"),
    (["run", "--config", "run.yaml", "--work-dir", "{ro}/w"], "not writable"),
    (["run", "--config", "run.yaml", "--device", "cuda:99"], "--device"),
    (["run", "--config", "user.jsonl"], "user.jsonl"),
    # tiny-model, demo, ui
    (["tiny-model", "save", "docs"], "not empty"),
    (["tiny-model", "save", "plainfile"], "is a file"),
    (["tiny-model", "save", "{ro}/m"], "not writable"),
    (["tiny-model", "save", "nowhere/m"], "does not exist"),
    (["demo", "--work-dir", "docs"], "not an earlier demo"),
    (["demo", "--work-dir", "plainfile"], "is a file"),
    (["demo", "--work-dir", "{ro}/demo"], "not writable"),
    # identity
    (["identity", "info", "nope.safetensors"], "nope.safetensors"),
    (["identity", "info", "garbage.mp4"], "garbage.mp4"),
    (["identity", "info", "lying.safetensors"], "lying.safetensors"),
    (["identity", "convert", "id.safetensors", "docs/notmine.safetensors"], "notmine.safetensors"),
    (["identity", "convert", "id.safetensors", "{ro}/x.safetensors"], "not writable"),
    (["identity", "convert", "id.safetensors", "nowhere/x.safetensors"], "does not exist"),
    # --from-record and the model flags
    (["generate", "--from-record", "user.jsonl"], "user.jsonl"),
    (["v2v", "--from-record", "nope.json"], "nope.json"),
    (GEN + ["--clip-skip", "abc"], "--clip-skip"),
    (GEN + ["--lora", "missing.safetensors"], "missing.safetensors"),
    (TRAIN + ["--lora-rank", "x"], "--lora-rank"),
    (["ui", "--port", "abc"], "--port"),
    (["ui", "--port", "70000"], "--port"),
    (["ui", "--device", "cuda:99"], "--device"),
    (["no-such-command"], "no-such-command"),
]


@pytest.mark.parametrize("argv, needle", CASES, ids=[" ".join(a)[:80] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(world, readonly, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(world)
    argv = [a.replace("{ro}", str(readonly)) for a in argv]
    before = snapshot(world)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert needle in err[0], err[0]
    assert "Traceback" not in err[0]
    assert snapshot(world) == before
