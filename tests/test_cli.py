import subprocess
import sys

import pytest

from magicme.cli import main
from magicme.video import read_sidecar, read_video


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
    code, cap = _run(["demo", "--out-dir", str(tmp_path / "demo"), "--quiet"], capsys)
    assert code == 0 and "wrote" in cap.out
    assert read_video(tmp_path / "demo" / "t2v.mp4").shape[0] == 16
