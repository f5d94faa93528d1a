"""`magicme run`: the whole chain on the tiny preset, skip-when-fresh, resume after a failure, config errors."""

import json

import pytest
import yaml

from magicme.cli import main
from magicme.demo import write_sample_identity
from magicme.evaluate import save_tiny_metric_models
from magicme.run import OUTPUTS, load_chain_config, run_chain
from magicme.video import read_video

CONFIG = {
    "images": "photos",
    "class_word": "toy",
    "token": "<v*>",
    "prompt": "a <v*> toy on the beach",
    "work_dir": "work",
    "models": {"base": "tiny"},
    "prepare": {"resolution": 64, "segmenter": {"method": "grabcut"}},
    "train": {"steps": 3, "batch_size": 2, "checkpoint_every": 0, "validation_images": 0},
    "generate": {"frames": 4, "steps": 2},
    "face": {"steps": 2},
    "upscale": {"scale": 2, "steps": 5},
    "evaluate": {},
    "metric_models": {"clip": "metrics/clip", "dino": "metrics/dino"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    write_sample_identity(root / "photos", count=2, size=64)
    save_tiny_metric_models(root / "metrics")
    return root


def write_config(root, name="run.yaml", **changes):
    cfg = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = root / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def first_run(project):
    result = run_chain(load_chain_config(write_config(project)), quiet=True, log=lambda m: None)
    return project, result


def test_chain_produces_every_stage_output(first_run):
    root, result = first_run
    assert result.ran == ["prepare", "train", "generate", "face", "upscale", "evaluate"]
    work = root / "work"
    for name in OUTPUTS.values():
        assert (work / name).exists(), name
    assert read_video(work / "t2v.mp4").shape == (4, 64, 64, 3)
    assert read_video(work / "upscaled.mp4").shape == (4, 128, 128, 3)
    scores = json.loads((work / "metrics.json").read_text())["scores"]
    assert scores["frames"] == 4 and scores["scored_prompt"] == "a toy on the beach"


def test_second_run_skips_everything_and_a_change_reruns_downstream_only(first_run):
    root, _ = first_run
    again = run_chain(load_chain_config(write_config(root)), quiet=True, log=lambda m: None)
    assert again.ran == [] and len(again.skipped) == 6
    changed = run_chain(load_chain_config(write_config(root, upscale={"strength": 0.6})), quiet=True, log=lambda m: None)
    assert changed.ran == ["upscale", "evaluate"]
    changed = run_chain(load_chain_config(write_config(root, seed=1, upscale={"strength": 0.6})), quiet=True, log=lambda m: None)
    assert changed.ran == ["train", "generate", "face", "upscale", "evaluate"]  # prepare does not use the seed


def test_rerun_after_a_failure_resumes(project, monkeypatch):
    import magicme.upscale

    cfg = load_chain_config(write_config(project, "fail.yaml", work_dir="work-fail"))

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(magicme.upscale, "tiled_vcd", boom)
    with pytest.raises(RuntimeError):
        run_chain(cfg, quiet=True, log=lambda m: None)
    assert not (project / "work-fail" / "upscaled.mp4").exists()
    monkeypatch.undo()
    result = run_chain(cfg, quiet=True, log=lambda m: None)
    assert result.skipped == ["prepare", "train", "generate", "face"] and result.ran == ["upscale", "evaluate"]


def test_toml_config_and_skipped_stages(project):
    path = project / "run.toml"
    path.write_text(
        'images = "photos"\nclass_word = "toy"\nprompt = "a <v*> toy"\nwork_dir = "work-toml"\nface = false\n'
        'upscale = false\nevaluate = false\n[models]\nbase = "tiny"\n[prepare]\nresolution = 64\n'
        '[prepare.segmenter]\nmethod = "grabcut"\n[train]\nsteps = 2\nbatch_size = 1\ncheckpoint_every = 0\n'
        'validation_images = 0\n[generate]\nframes = 2\nsteps = 1\n'
    )
    result = run_chain(load_chain_config(path), quiet=True, log=lambda m: None)
    assert result.ran == ["prepare", "train", "generate"]


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"colour": "red"}, "unknown keys"),
        ({"generate": {"strength": 0.5}}, "does not take"),
        ({"prompt": "a toy on the beach"}, "<v*>"),
        ({"images": "nowhere"}, "nowhere"),
        ({"train": False}, "cannot be turned off"),
        ({"gamma": 1.5}, "gamma"),
    ],
)
def test_config_errors_are_one_line_exit_2_before_any_work(project, capsys, changes, needle):
    path = write_config(project, "bad.yaml", work_dir="work-bad", **changes)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (project / "work-bad").exists()
