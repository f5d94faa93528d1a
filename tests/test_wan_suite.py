"""evaluate-suite and report on Wan: one backbone, and both compared on the same subjects and prompts in one report."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from magicme.cli import main
from magicme.evaluate import save_tiny_metric_models
from magicme.identity import IdentityInfo, save_identity
from magicme.suite import load_suite, load_suites, read_rows, run_suite
from magicme.video import read_sidecar


@pytest.fixture
def project(tmp_path):
    metrics = save_tiny_metric_models(tmp_path / "metric")
    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    for name, backbone in (("dog_ad", "animatediff"), ("dog_wan", "wan")):
        info = IdentityInfo(token="<v*>", class_word="dog", num_vectors=2, hidden_size=32, backbone=backbone)
        save_identity(tmp_path / f"{name}.safetensors", torch.randn(2, 32, generator=torch.Generator().manual_seed(1)), info)
    doc = {
        "seeds": [0], "frames": 5, "steps": 2, "height": 32, "width": 32, "video_format": "gif",
        "clip_model": metrics.clip, "dino_model": metrics.dino,
        "backbones": {"animatediff": {"base": "tiny"}, "wan": {"base": "tiny", "backbone": "wan", "guidance": 5.0}},
        "subjects": [{"name": "dog", "identity": {"animatediff": "dog_ad.safetensors", "wan": "dog_wan.safetensors"},
                      "references": "refs", "prompts": ["a <v*> dog on the beach", "a <v*> dog in the snow"]}],
    }
    (tmp_path / "subjects.yaml").write_text(json.dumps(doc))
    return tmp_path


def test_a_suite_on_wan_matches_magicme_generate(project, tmp_path):
    cfg = load_suites(project / "subjects.yaml")["wan"]
    run = run_suite(cfg, tmp_path / "wan.jsonl", quiet=True, device="cpu")
    rows = read_rows(run.results)
    assert run.scored == 2 and {r["config"]["models"]["backbone"] for r in rows} == {"wan"}
    clip = tmp_path / rows[0]["video"]
    record = read_sidecar(clip)
    assert record["backbone"] == "wan" and record["guidance"] == 5.0 and record["models"]["identities"][0]["form"] == "tokens"
    # the same clip as `magicme generate` makes with the same settings
    out = tmp_path / "gen.gif"
    assert main(["generate", "--backbone", "wan", "--identity", str(project / "dog_wan.safetensors"), "--prompt", rows[0]["prompt"],
                 "--frames", "5", "--steps", "2", "--height", "32", "--width", "32", "--guidance", "5", "--seed", "0",
                 "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(Image.open(clip).convert("RGB")))


def test_both_backbones_in_one_report(project, tmp_path, capsys):
    results = tmp_path / "res.jsonl"
    assert main(["evaluate-suite", "--subjects", str(project / "subjects.yaml"), "--results", str(results),
                 "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("animatediff", "wan"):
        rows = read_rows(tmp_path / f"res.{name}.jsonl")
        assert [(r["prompt"], r["seed"]) for r in rows] == [("a <v*> dog on the beach", 0), ("a <v*> dog in the snow", 0)]
    report = (tmp_path / "res.report" / "report.md").read_text()
    assert "| animatediff | wan |" in report.splitlines()[next(i for i, l in enumerate(report.splitlines()) if "DINO" in l) - 2]
    assert "res.report" in out


def test_a_subject_needs_an_identity_of_the_backbone(project, tmp_path):
    doc = json.loads((project / "subjects.yaml").read_text())
    doc.pop("backbones")
    doc["backbone"], doc["base"] = "wan", "tiny"
    doc["subjects"][0]["identity"] = "dog_ad.safetensors"
    (project / "bad.yaml").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="AnimateDiff .*identity"):
        load_suite(project / "bad.yaml")
    doc["backbones"] = {"wan": {"backbone": "wan"}}
    doc["subjects"][0]["identity"] = {"animatediff": "dog_ad.safetensors"}
    (project / "bad.yaml").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not 'wan'"):
        load_suites(project / "bad.yaml")
