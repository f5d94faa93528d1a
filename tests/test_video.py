import numpy as np
import pytest

from magicme.video import check_output_path, read_video, sidecar_path, write_video


def _clip(f=4, h=16, w=24):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (f, h, w, 3), dtype=np.uint8)


def test_png_folder_and_gif_are_lossless(tmp_path):
    clip = _clip()
    assert np.array_equal(read_video(write_video(clip, tmp_path / "frames")), clip)
    assert read_video(write_video(clip, tmp_path / "a.gif")).shape == clip.shape


def test_mp4_is_h264_yuv420p(tmp_path):
    import subprocess

    import imageio_ffmpeg

    path = write_video(_clip(6, 32, 32), tmp_path / "a.mp4")
    assert read_video(path).shape == (6, 32, 32, 3)
    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(path)], capture_output=True, text=True).stderr
    assert "h264" in info and "yuv420p" in info


def test_float_frames_and_odd_size_mp4(tmp_path):
    clip = np.random.default_rng(1).random((3, 15, 17, 3)).astype(np.float32)
    frames = read_video(write_video(clip, tmp_path / "odd.mp4"))
    assert frames.shape[0] == 3 and frames.shape[1] >= 15 and frames.shape[2] >= 17


def test_bad_outputs(tmp_path):
    with pytest.raises(ValueError, match="suffix"):
        check_output_path(tmp_path / "a.avi")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "a.mp4")
    assert sidecar_path(tmp_path / "a.mp4").name == "a.mp4.json"


def test_undecodable_and_missing(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="cannot be decoded"):
        read_video(bad)
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "nope.mp4")
