"""`magicme run`: the whole chain on the tiny preset, skip-when-fresh, seeds, one model load, resume, config errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from magicme.cli import main
from magicme.demo import write_sample_identity
from magicme.evaluate import save_tiny_metric_models
from magicme.run import chain_summary, load_chain_config, run_chain
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
    "metric_models": {"clip": "metrics/clip", "dino": "tiny"},  # a saved folder and the built-in tiny model
}


QUIET = dict(quiet=True, log=lambda m: None)
VIDEO_STAGES = ["generate s0", "face s0", "upscale s0", "evaluate s0"]


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
    result = run_chain(load_chain_config(write_config(project)), **QUIET)
    return project, result


def test_chain_produces_every_stage_output(first_run):
    root, result = first_run
    assert result.ran == ["prepare", "train", *VIDEO_STAGES]
    work = root / "work"
    for name in ("prepared", "identity.safetensors", "t2v_s0.mp4", "face_s0.mp4", "upscaled_s0.mp4", "metrics_s0.json"):
        assert (work / name).exists(), name
    assert read_video(work / "t2v_s0.mp4").shape == (4, 64, 64, 3)
    assert read_video(work / "upscaled_s0.mp4").shape == (4, 128, 128, 3)
    scores = json.loads((work / "metrics_s0.json").read_text())["scores"]
    assert scores["frames"] == 4 and scores["scored_prompt"] == "a toy on the beach"
    summary = chain_summary(result)  # the end-of-run table: every stage with its time, then the metrics
    for label in result.ran:
        assert f"{label}  " in summary
    assert "ran in" in summary and f"CLIP-I {scores['clip_i']:.3f}" in summary and f"DINO {scores['dino']:.3f}" in summary


def test_second_run_skips_everything_and_a_change_reruns_downstream_only(first_run):
    root, _ = first_run
    again = run_chain(load_chain_config(write_config(root)), **QUIET)
    assert again.ran == [] and len(again.skipped) == 6
    assert "up to date" in chain_summary(again)
    changed = run_chain(load_chain_config(write_config(root, upscale={"strength": 0.6})), **QUIET)
    assert changed.ran == ["upscale s0", "evaluate s0"]
    changed = run_chain(load_chain_config(write_config(root, train={"seed": 1}, upscale={"strength": 0.6})), **QUIET)
    assert changed.ran == ["train", *VIDEO_STAGES]  # prepare does not use the seed


def test_a_new_video_seed_reruns_only_the_video_stages_and_keeps_the_old_clips(project):
    cfg = load_chain_config(write_config(project, "seeds.yaml", work_dir="work-seeds", face=False, evaluate=False))
    run_chain(cfg, **QUIET)
    work = project / "work-seeds"
    old = {name: (work / name).read_bytes() for name in ("identity.safetensors", "t2v_s0.mp4", "upscaled_s0.mp4")}
    result = run_chain(load_chain_config(write_config(project, "seeds.yaml", work_dir="work-seeds", face=False, evaluate=False,
                                                      generate={"seed": 7})), **QUIET)
    assert result.skipped == ["prepare", "train"] and result.ran == ["generate s7", "upscale s7"]  # no retraining
    assert {name: (work / name).read_bytes() for name in old} == old  # the old clips and the identity are untouched
    assert not np.array_equal(read_video(work / "t2v_s7.mp4"), read_video(work / "t2v_s0.mp4"))
    both = run_chain(load_chain_config(write_config(project, "seeds.yaml", work_dir="work-seeds", face=False, evaluate=False,
                                                    generate={"seeds": [0, 7]})), **QUIET)
    assert both.ran == [] and both.skipped == ["prepare", "train", "generate s0", "upscale s0", "generate s7", "upscale s7"]


def test_top_level_seed_is_the_old_name_of_the_video_seed(project, capsys):
    cfg = load_chain_config(write_config(project, "old.yaml", seed=5))
    assert cfg.video_seeds() == [5] and "seed" not in cfg.stages["train"]
    assert "generate.seed" in capsys.readouterr().err


def test_training_shares_the_loaded_weights_with_the_video_stages(project, monkeypatch):
    """One load of the base model for train + generate, and the identity is bit for bit `magicme train`'s."""
    import importlib

    from safetensors.torch import load_file

    from magicme.run import build_stage_configs
    from magicme.train import train

    loads = []
    models, training = importlib.import_module("magicme.models"), importlib.import_module("magicme.train")
    real = models.tiny_components

    def counted(*a, **k):
        loads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(models, "tiny_components", counted)  # the module: `magicme.train` is also the function
    monkeypatch.setattr(training, "tiny_components", counted)
    cfg = load_chain_config(write_config(project, "shared.yaml", work_dir="work-shared", face=False, upscale=False, evaluate=False))
    run_chain(cfg, **QUIET)
    assert len(loads) == 1  # loading separately for training and the video took two
    alone = dataclasses.replace(build_stage_configs(cfg)["train"], out=project / "alone.safetensors")
    train(alone, quiet=True, device="cpu")
    shared, own = load_file(project / "work-shared" / "identity.safetensors"), load_file(project / "alone.safetensors")
    assert shared.keys() == own.keys() and all(torch.equal(shared[k], own[k]) for k in shared)
    # the borrowed text encoder went back as it came: the clip equals one from a freshly loaded pipeline
    from magicme.generate import generate

    monkeypatch.undo()
    fresh = project / "fresh.mp4"
    generate(dataclasses.replace(build_stage_configs(cfg)["generate"], seeds=[0]), fresh, quiet=True, device="cpu")
    assert np.array_equal(read_video(fresh), read_video(project / "work-shared" / "t2v_s0.mp4"))


def test_rerun_after_a_failure_resumes(project, monkeypatch):
    import magicme.upscale

    cfg = load_chain_config(write_config(project, "fail.yaml", work_dir="work-fail"))

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(magicme.upscale, "tiled_vcd", boom)
    with pytest.raises(RuntimeError):
        run_chain(cfg, quiet=True, log=lambda m: None)
    assert not (project / "work-fail" / "upscaled_s0.mp4").exists()
    monkeypatch.undo()
    result = run_chain(cfg, **QUIET)
    assert result.skipped == ["prepare", "train", "generate s0", "face s0"] and result.ran == ["upscale s0", "evaluate s0"]


def test_toml_config_and_skipped_stages(project):
    path = project / "run.toml"
    path.write_text(
        'images = "photos"\nclass_word = "toy"\nprompt = "a <v*> toy"\nwork_dir = "work-toml"\nface = false\n'
        'upscale = false\nevaluate = false\n[models]\nbase = "tiny"\n[prepare]\nresolution = 64\n'
        '[prepare.segmenter]\nmethod = "grabcut"\n[train]\nsteps = 2\nbatch_size = 1\ncheckpoint_every = 0\n'
        'validation_images = 0\n[generate]\nframes = 2\nsteps = 1\n'
    )
    result = run_chain(load_chain_config(path), **QUIET)
    assert result.ran == ["prepare", "train", "generate s0"]


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"colour": "red"}, "unknown keys"),
        ({"generate": {"strength": 0.5}}, "does not take"),
        ({"prompt": "a toy on the beach"}, "<v*>"),
        ({"images": "nowhere"}, "nowhere"),
        ({"train": False}, "cannot be turned off"),
        ({"gamma": 1.5}, "gamma"),
        ({"upscale": {"seed": 3}}, "generate.seed"),
        ({"generate": {"seed": 1, "seeds": [2]}}, "not both"),
        # wrong types: one line naming the key
        ({"prompt": 5}, "prompt must be a string"),
        ({"gamma": "high"}, "gamma must be a number"),
        ({"face": 3}, "face must be"),
        ({"models": "tiny"}, "models must be a table"),
        ({"models": {"speed": {"low_vram": "yes"}}}, "models.speed.low_vram must be true or false"),
        ({"train": {"steps": "abc"}}, "train.steps must be an integer"),
        ({"train": {"lr": True}}, "train.lr must be a number"),
        ({"train": {"augment": {"zoom": [1.2]}}}, "train.augment.zoom"),
        ({"generate": {"frames": 2.5}}, "generate.frames must be an integer"),
        ({"generate": {"seed": "x"}}, "generate.seed must be an integer"),
        ({"generate": {"seeds": [1, "two"]}}, "generate.seeds[1] must be an integer"),
        ({"generate": {"prompt_at": {"x": "a <v*> toy"}}}, "generate.prompt_at key"),
        ({"prepare": {"segmenter": {"box_threshold": "x"}}}, "prepare.segmenter.box_threshold must be a number"),
        ({"upscale": {"tile": "big"}}, "upscale.tile must be an integer or null"),
        ({"metric_models": {"batch_size": "x"}}, "metric_models.batch_size must be an integer"),
        ({"evaluate": {"clip": 3}}, "evaluate.clip must be a string"),
    ],
)
def test_config_errors_are_one_line_exit_2_before_any_work(project, capsys, changes, needle):
    path = write_config(project, "bad.yaml", work_dir="work-bad", **changes)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (project / "work-bad").exists()
