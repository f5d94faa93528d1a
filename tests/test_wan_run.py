"""`magicme run` on Wan: the whole chain (prepare → train → generate → face → upscale → evaluate) on the tiny Wan preset."""

import json

import pytest
import yaml

from magicme.cli import main
from magicme.demo import write_sample_identity
from magicme.evaluate import save_tiny_metric_models
from magicme.run import load_chain_config, run_chain
from magicme.video import read_sidecar, read_video

CONFIG = {
    "images": "photos",
    "class_word": "toy",
    "prompt": "a <v*> toy on the beach",
    "work_dir": "work",
    "models": {"base": "tiny", "backbone": "wan"},
    "prepare": {"resolution": 64, "segmenter": {"method": "grabcut"}},
    "train": {"steps": 2, "batch_size": 1, "checkpoint_every": 0, "validation_images": 0, "form": "lora", "lora_rank": 2},
    "generate": {"frames": 5, "steps": 2, "height": 48, "width": 48},
    "face": {"steps": 2},
    "upscale": {"scale": 2, "steps": 5, "tile": 64},
    "evaluate": {},
    "metric_models": {"clip": "tiny", "dino": "tiny"},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("wanchain")
    write_sample_identity(root / "photos", count=2, size=64)
    save_tiny_metric_models(root / "metrics")
    return root


def write_config(root, name, **changes):
    cfg = json.loads(json.dumps(CONFIG)) | changes
    (root / name).write_text(yaml.safe_dump(cfg))
    return root / name


def test_chain_runs_on_tiny_wan(project):
    result = run_chain(load_chain_config(write_config(project, "run.yaml")), quiet=True, log=lambda m: None)
    assert result.ran == ["prepare", "train", "generate s0", "face s0", "upscale s0", "evaluate s0"]
    w = project / "work"
    identity = json.loads((w / "identity.safetensors.json").read_text())["identity"]
    assert identity["backbone"] == "wan" and identity["form"] == "lora"
    t2v = read_sidecar(w / "t2v_s0.mp4")
    assert t2v["backbone"] == "wan" and t2v["fps"] == 16 and read_video(w / "t2v_s0.mp4").shape == (5, 48, 48, 3)
    for stage in ("face", "upscaled"):
        record = read_sidecar(w / f"{stage}_s0.mp4")
        assert record["models"]["backbone"] == "wan" and record["fps"] == 16  # the clip's rate, not V2V's default 8
    assert read_video(w / "upscaled_s0.mp4").shape == (5, 96, 96, 3)
    assert set(result.metrics()[0]) >= {"clip_i", "dino", "clip_t"}
    again = run_chain(load_chain_config(write_config(project, "run.yaml")), quiet=True, log=lambda m: None)
    assert again.ran == []


def test_wan_only_keys_and_sd_only_keys_are_refused_per_backbone(project, capsys):
    ad = write_config(project, "ad.yaml", models={"base": "tiny"})
    assert main(["run", "--config", str(ad)]) == 2
    assert "'form'" in capsys.readouterr().err  # form/lora_rank are Wan's
    cn = write_config(project, "cn.yaml", upscale={"controlnet": "lllyasviel/control_v11f1e_sd15_tile"})
    assert main(["run", "--config", str(cn)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--controlnet" in err[0] and not (project / "work-cn").exists()
