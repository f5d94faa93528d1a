import hashlib
import subprocess
import sys

import pytest

from magicme.cli import main
from magicme.video import read_sidecar, read_video, sidecar_path as sidecar


def _run(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_generate_cli_writes_video_and_sidecar(tmp_path, capsys):
    out = tmp_path / "v.gif"
    code, cap = _run(["generate", "--prompt", "a dog", "--frames", "3", "--steps", "2", "--seed", "4", "--out", str(out), "--quiet"], capsys)
    assert code == 0 and str(out) in cap.out
    assert read_video(out).shape == (3, 64, 64, 3)
    assert read_sidecar(out)["seed"] == 4


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--gamma", "1.0"], "--gamma"),
        (["--gamma", "-0.2"], "--gamma"),
        (["--frames", "0"], "--frames"),
        (["--height", "60"], "--height"),
        (["--width", "0"], "--width"),
        (["--steps", "0"], "--steps"),
        (["--scheduler", "plms"], "--scheduler"),
        (["--out", "x.avi"], "--out"),
        (["--out", "missing-dir/x.mp4"], "--out"),
        (["--base", "missing.safetensors"], "missing.safetensors"),
        (["--identity", "nope.safetensors"], "--identity"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    code, cap = _run(["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", *args], capsys)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "error" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, magicme.cli as c\ntry:\n    c.build_parser().parse_args(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.strip().endswith("False")


def test_tiny_model_save_and_demo(tmp_path, capsys):
    code, _ = _run(["tiny-model", "save", str(tmp_path / "m")], capsys)
    assert code == 0 and (tmp_path / "m" / "motion_adapter" / "config.json").exists()
    code, cap = _run(["tiny-model", "save", str(tmp_path / "m")], capsys)
    assert code == 2 and "not empty" in cap.err
    code, cap = _run(["demo", "--work-dir", str(tmp_path / "demo"), "--quiet"], capsys)
    assert code == 0 and "t2v_s42.mp4" in cap.out and "metrics s42: CLIP-I" in cap.out  # the end-of-run summary
    assert len(_warnings(cap.err)) == 1 and "noise" in cap.err
    assert read_video(tmp_path / "demo" / "t2v_s42.mp4").shape[0] == 16


# ---- issue 15: honest defaults, reproducible records, one flag name per idea ----

def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning:" in line]


def test_tiny_model_warning_once_per_command_and_not_for_real_weights(tmp_path, capsys, tiny_model_dir):
    code, cap = _run(["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--out", str(tmp_path / "a.gif"), "--quiet"], capsys)
    warnings = _warnings(cap.err)
    assert code == 0 and len(warnings) == 1
    assert "--base tiny" in warnings[0] and "noise" in warnings[0] and "--base stable-diffusion-v1-5/" in warnings[0]
    code, cap = _run(["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--base", str(tiny_model_dir),
                      "--out", str(tmp_path / "b.gif"), "--quiet"], capsys)
    assert code == 0 and _warnings(cap.err) == []  # a folder of weights the user named: no warning


def test_offline_not_found_says_how_to_get_weights_and_never_suggests_the_failed_id(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "nobody-here/no-such-model"):
        code, cap = _run(["generate", "--prompt", "a dog", "--base", name, "--out", "x.mp4"], capsys)
        lines = cap.err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        line = lines[0]
        assert f"hf download {name} --local-dir DIR" in line and "huggingface-cli download" in line
        assert "HF_HUB_OFFLINE is set, so only the local hub cache" in line
        assert "e.g." not in line and line.count(name) == 3  # the failed id, and how to download it; no other id offered
    assert list(tmp_path.iterdir()) == []
    code, cap = _run(["evaluate", "--video", "x.mp4", "--references", ".", "--prompt", "a dog"], capsys)  # hub metric models
    assert code == 2


def test_evaluate_runs_offline_with_tiny_metric_models(tmp_path, capsys):
    import json

    from magicme.demo import write_sample_identity

    write_sample_identity(tmp_path / "refs", count=2, size=64)
    code, _ = _run(["generate", "--prompt", "a toy", "--frames", "3", "--steps", "1", "--out", str(tmp_path / "v.gif"), "--quiet"], capsys)
    code, cap = _run(["evaluate", "--video", str(tmp_path / "v.gif"), "--references", str(tmp_path / "refs"),
                      "--prompt", "a toy", "--clip-model", "tiny", "--dino-model", "tiny"], capsys)
    assert code == 0, cap.err
    row = json.loads(cap.out)
    assert row["frames"] == 3 and -1 <= row["clip_i"] <= 1 and -1 <= row["dino"] <= 1
    assert len(_warnings(cap.err)) == 1 and "mean nothing" in cap.err


def test_from_record_reproduces_a_clip_byte_for_byte_and_flags_override(tmp_path, capsys):
    first = tmp_path / "first.mp4"
    code, _ = _run(["generate", "--prompt", "a dog", "--prompt-at", "2:a cat", "--frames", "4", "--steps", "3",
                    "--seed", "3", "--gamma", "0.3", "--guidance", "5", "--scheduler", "euler", "--out", str(first), "--quiet"], capsys)
    assert code == 0
    record = read_sidecar(first)
    assert record["dtype"] == "fp32" and record["device"] == "cpu"  # what ran (models.speed.dtype: what was asked, auto)
    again = tmp_path / "again.mp4"
    code, cap = _run(["generate", "--from-record", str(sidecar(first)), "--out", str(again), "--quiet"], capsys)
    assert code == 0, cap.err
    assert again.read_bytes() == first.read_bytes()
    other = tmp_path / "other.mp4"
    code, _ = _run(["generate", "--from-record", str(sidecar(first)), "--seed", "4", "--out", str(other), "--quiet"], capsys)
    rec = read_sidecar(other)
    assert code == 0 and rec["seed"] == 4 and rec["gamma"] == 0.3 and rec["steps"] == 3 and rec["prompt_at"]["2"] == "a cat"
    assert rec["models"]["scheduler"] == "euler" and other.read_bytes() != first.read_bytes()
    code, cap = _run(["upscale", "--from-record", str(sidecar(first))], capsys)
    assert code == 2 and "'t2v' record" in cap.err


def test_from_record_repeats_v2v_stages_on_the_recorded_input_and_hashes_it(tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    _run(["generate", "--prompt", "a dog", "--frames", "3", "--steps", "1", "--out", str(clip), "--quiet"], capsys)
    up = tmp_path / "up.mp4"
    code, cap = _run(["upscale", "--video", str(clip), "--prompt", "a dog", "--steps", "5", "--seed", "2", "--tile", "64",
                      "--overlap", "16", "--tile-batch", "3", "--out", str(up), "--quiet"], capsys)
    assert code == 0, cap.err
    record = read_sidecar(up)
    assert record["input"]["sha256"] == hashlib.sha256(b"clip.mp4" + clip.read_bytes()).hexdigest()
    assert record["dtype"] == "fp32" and record["device"] == "cpu"
    again = tmp_path / "again.mp4"
    code, cap = _run(["upscale", "--from-record", str(sidecar(up)), "--out", str(again), "--quiet"], capsys)
    assert code == 0 and again.read_bytes() == up.read_bytes() and _warnings(cap.err) == [_warnings(cap.err)[0]]
    _run(["generate", "--prompt", "a dog", "--frames", "3", "--steps", "1", "--seed", "9", "--out", str(clip), "--quiet"], capsys)
    code, cap = _run(["upscale", "--from-record", str(sidecar(up)), "--out", str(tmp_path / "changed.mp4"), "--quiet"], capsys)
    assert code == 0 and "input video" in cap.err and "has changed since the record was written" in cap.err
    code, cap = _run(["upscale", "--prompt", "a dog"], capsys)
    assert code == 2 and "--video is required" in cap.err


def test_train_from_record_reproduces_the_identity(tmp_path, capsys):
    import torch
    from safetensors import safe_open

    from magicme.demo import write_sample_identity

    write_sample_identity(tmp_path / "photos", count=2, size=64)
    _run(["prepare", "--images", str(tmp_path / "photos"), "--class-word", "toy", "--out", str(tmp_path / "prep"),
          "--resolution", "64", "--segmenter", "grabcut", "--quiet"], capsys)
    first = tmp_path / "first.safetensors"
    code, cap = _run(["train", "--data", str(tmp_path / "prep"), "--steps", "2", "--batch-size", "1", "--seed", "5",
                      "--checkpoint-every", "0", "--out", str(first), "--quiet"], capsys)
    assert code == 0, cap.err
    record = read_sidecar(first)
    assert record["dtype"] == "fp32" and record["device"] == "cpu" and len(record["data_sha256"]) == 64
    again = tmp_path / "again.safetensors"
    code, cap = _run(["train", "--from-record", str(sidecar(first)), "--out", str(again), "--quiet"], capsys)
    assert code == 0, cap.err
    # the same vectors and metadata (safetensors writes its metadata in hash order, so not the same bytes)
    with safe_open(str(first), "pt") as a, safe_open(str(again), "pt") as b:
        assert a.metadata() == b.metadata() and a.keys() == b.keys()
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    # the record's precision is what ran ("auto" resolved), so a rerun elsewhere does not pick another
    assert read_sidecar(again)["config"] == {**record["config"], "out": str(again), "mixed_precision": "no"}


def test_every_command_help_shows_defaults_and_one_flag_name_per_idea(capsys):
    from magicme.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():  # every option with a default says it (or says what None means)
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, "") and action.help != "==SUPPRESS==" \
                    and action.dest != "help":
                assert "default" in sub._get_formatter()._expand_help(action), (name, action.dest)
    train_help = commands["train"].format_help().split("options:")[1]
    for flag, default in (("--steps STEPS", "200"), ("--lr LR", "0.001"), ("--num-vectors NUM_VECTORS", "4"), ("--seed SEED", "0")):
        block = train_help[train_help.index(flag):].split("\n  --")[0]
        assert f"default: {default}" in block, (flag, block)
    # --work-dir everywhere; the old spellings still work for one release, hidden, with a note
    assert "--work-dir" in commands["demo"].format_help() and "--out-dir" not in commands["demo"].format_help()
    assert "--work-dir" in commands["ui"].format_help() and "--workdir" not in commands["ui"].format_help()
    assert "--work-dir" in commands["run"].format_help()
    assert parser.parse_args(["demo", "--out-dir", "d"]).work_dir == "d"
    assert parser.parse_args(["ui", "--workdir", "w"]).workdir == "w" == parser.parse_args(["ui", "--work-dir", "w"]).workdir
    err = capsys.readouterr().err
    assert "--out-dir is deprecated" in err and "use --work-dir" in err and "--workdir is deprecated" in err


def test_quiet_silences_the_libraries_loading_bars(tmp_path, capsys, tiny_model_dir):
    args = ["generate", "--prompt", "a dog", "--frames", "2", "--steps", "1", "--base", str(tiny_model_dir)]
    code, cap = _run([*args, "--out", str(tmp_path / "a.gif")], capsys)
    assert code == 0 and "Loading" in cap.err  # diffusers' and transformers' own bars
    code, cap = _run([*args, "--out", str(tmp_path / "b.gif"), "--quiet"], capsys)
    assert code == 0 and "Loading" not in cap.err
    code, cap = _run([*args, "--out", str(tmp_path / "c.gif")], capsys)
    assert "Loading" in cap.err  # restored after the command


def test_progress_bars_are_labelled_and_count_the_whole_stage(tmp_path, capsys, monkeypatch):
    import re

    import magicme.progress

    monkeypatch.setattr(magicme.progress, "on_terminal", lambda: True)
    code, cap = _run(["generate", "--prompt", "a dog", "--frames", "2", "--steps", "3", "--seed", "1", "--seed", "2",
                      "--out", str(tmp_path / "g.gif")], capsys)
    assert code == 0 and re.search(r"generate: 100%.*\b6/6\b", cap.err) and "clip 2/2, seed 2" in cap.err
    code, cap = _run(["upscale", "--video", str(tmp_path / "g_p0_s1.gif"), "--prompt", "a dog", "--steps", "10",
                      "--tile", "64", "--overlap", "32", "--tile-batch", "2", "--out", str(tmp_path / "u.gif")], capsys)
    # 128² upscaled frame, tiles of 64 keeping an overlap of 32: 2 × 2 = 4 (widened) tiles in 2 batches × int(10 × 0.2) = 2 steps
    assert code == 0 and re.search(r"tiled VCD: 100%.*\b4/4\b", cap.err) and "tiles 3-4 of 4" in cap.err
