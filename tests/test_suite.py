import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from magicme import evaluate
from magicme.cli import main
from magicme.evaluate import save_tiny_metric_models
from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec, load_pipeline
from magicme.suite import jobs, load_suite, merge_results, read_rows, row_key, run_suite, use_identity

METRICS = ("clip_i", "dino", "clip_t", "temporal_clip", "temporal_dino", "motion")


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    return save_tiny_metric_models(tmp_path_factory.mktemp("metric") / "models")


def _identity(path, seed, masked=True, token="<v*>"):
    g = torch.Generator().manual_seed(seed)
    info = IdentityInfo(token=token, class_word="dog", num_vectors=2, hidden_size=32, masked=masked)
    return save_identity(path, torch.randn(2, 32, generator=g), info)


@pytest.fixture
def project(tmp_path, metric_models):
    """A subjects file: two subjects (one trained without the mask), 2 + 1 prompts, 2 seeds → 6 videos."""
    refs = tmp_path / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    _identity(tmp_path / "dog.safetensors", 1)
    _identity(tmp_path / "dog_nomask.safetensors", 2, masked=False)
    doc = {
        "seeds": [0, 1], "frames": 3, "steps": 2, "video_format": "gif",
        "clip_model": metric_models.clip, "dino_model": metric_models.dino,
        "subjects": [
            {"name": "dog", "identity": "dog.safetensors", "references": "refs",
             "prompts": ["a <v*> dog on the beach", "a <v*> dog in the snow"]},
            {"name": "dog-nomask", "identity": "dog_nomask.safetensors", "references": "refs",
             "prompts": ["a <v*> dog on the beach"]},
        ],
    }
    (tmp_path / "subjects.yaml").write_text(json.dumps(doc))  # JSON is YAML
    return tmp_path


def _keyed(rows):
    return {row_key(r): r for r in rows}


def test_suite_rows_resume_without_duplicates(project, monkeypatch):
    cfg = load_suite(project / "subjects.yaml")
    assert len(jobs(cfg)) == 6
    results = project / "results.jsonl"
    calls = []
    real = evaluate.Scorer.score

    def interrupted(self, *a, **k):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(evaluate.Scorer, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_suite(cfg, results, device="cpu", quiet=True)
    first = read_rows(results)
    assert len(first) == 4
    with open(results, "a") as fh:
        fh.write('{"subject": "dog", "prompt": "a <v*> dog in the sn')  # a row cut short by the crash

    calls.clear()
    run = run_suite(cfg, results, device="cpu", quiet=True)
    assert run.scored == 2 and len(calls) == 2  # only the missing videos were made
    rows = read_rows(results)
    assert len(rows) == 6 and len(_keyed(rows)) == 6  # every job once
    assert rows[:4] == first  # nothing lost or rewritten
    assert results.read_text().count("\n") == 1 + 6  # the suite's header line and 6 rows: the broken line is gone
    nomask = [r for r in rows if r["subject"] == "dog-nomask"]
    assert len(nomask) == 2 and all(r["masked"] is False for r in nomask)
    assert all(r["masked"] is True for r in rows if r["subject"] == "dog")
    assert all(r["scored_prompt"].startswith("a dog") for r in rows)
    assert all((project / r["video"]).exists() and (project / (r["video"] + ".json")).exists() for r in rows)
    assert run_suite(cfg, results, device="cpu", quiet=True).scored == 0  # done: nothing to redo


def test_a_results_file_from_another_configuration_is_refused(project):
    results = project / "results.jsonl"
    cfg = load_suite(project / "subjects.yaml", seeds=[0])
    cfg.subjects = cfg.subjects[:1]
    run_suite(cfg, results, device="cpu", quiet=True)
    before = results.read_bytes()
    ablation = load_suite(project / "subjects.yaml", seeds=[0], gamma=0.0)  # "w/o noise prior"
    with pytest.raises(ValueError, match="another configuration.*gamma"):
        run_suite(ablation, results, device="cpu", quiet=True)
    assert results.read_bytes() == before
    _identity(project / "dog.safetensors", 99)  # the identity was retrained
    with pytest.raises(ValueError, match="different identity"):
        run_suite(cfg, results, device="cpu", quiet=True)
    assert results.read_bytes() == before


@pytest.mark.parametrize(
    "edit, error, needle",
    [
        (lambda d: d["subjects"][0].update(identity="missing.safetensors"), FileNotFoundError, "identity file"),
        (lambda d: d["subjects"][0].update(references="no-refs"), FileNotFoundError, "reference folder"),
        (lambda d: d["subjects"][0].update(prompts=[]), ValueError, "prompt list is empty"),
        (lambda d: d["subjects"][0].update(prompts=["a dog without token"]), ValueError, "identity token"),
        (lambda d: d["subjects"][0].update(colour="red"), ValueError, "unknown keys"),
        (lambda d: d.update(gamma=1.5), ValueError, "--gamma"),
        (lambda d: d["subjects"][1].update(name="dog"), ValueError, "unique"),
    ],
)
def test_bad_subjects_files(project, edit, error, needle):
    path = project / "subjects.yaml"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(error, match=needle):
        load_suite(path)


def test_bad_subjects_file_from_the_cli_keeps_results(project, capsys):
    results = project / "results.jsonl"
    results.write_text('{"kept": true}\n')
    doc = json.loads((project / "subjects.yaml").read_text())
    doc["subjects"][1]["references"] = "gone"
    (project / "subjects.yaml").write_text(json.dumps(doc))
    code = main(["evaluate-suite", "--subjects", str(project / "subjects.yaml"), "--results", str(results)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dog-nomask" in err[0] and "reference folder" in err[0]
    assert results.read_text() == '{"kept": true}\n'


def test_subjects_sharing_a_token_each_get_their_own_embeddings(project):
    pipe = load_pipeline(ModelSpec(), device="cpu")
    loaded = {}
    use_identity(pipe, project / "dog.safetensors", loaded)
    emb = pipe.text_encoder.get_input_embeddings().weight  # resized by the first load
    ids = pipe.tokenizer.convert_tokens_to_ids(["<v*>", "<v*>_1"])
    first = emb[ids].clone()
    use_identity(pipe, project / "dog_nomask.safetensors", loaded)
    from magicme.identity import read_identity

    assert torch.equal(emb[ids], read_identity(project / "dog_nomask.safetensors")[0])
    assert not torch.equal(emb[ids], first)
    use_identity(pipe, project / "dog.safetensors", loaded)
    assert torch.equal(emb[ids], first)


def test_merge_folds_part_files_without_loss_or_duplicates(tmp_path):
    results = tmp_path / "r.jsonl"
    row = lambda s, seed: json.dumps({"subject": s, "prompt": "p", "seed": seed, "config_id": "c"}) + "\n"  # noqa: E731
    results.write_text(row("a", 0))
    (tmp_path / "r.jsonl.part-000").write_text(row("a", 0) + row("a", 1))
    (tmp_path / "r.jsonl.part-001").write_text(row("b", 0) + row("b", 1)[:-9])  # an interrupted last line
    assert merge_results(results) == 3
    assert [(r["subject"], r["seed"]) for r in read_rows(results)] == [("a", 0), ("a", 1), ("b", 0)]
    assert not list(tmp_path.glob("*.part-*"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_accelerate_processes_give_the_rows_of_one(project):
    """`accelerate launch` with 2 CPU processes (torchrun + gloo) writes the same rows as one process.

    accelerate's `--cpu` flag alone starts a single process unless MPI is installed; `--multi_gpu`
    on a machine without GPUs starts the processes with torchrun and our PartialState(cpu=True)
    joins them in a gloo group, which is the same code path as many GPUs.
    """
    one = project / "one.jsonl"
    run_suite(load_suite(project / "subjects.yaml"), one, device="cpu", quiet=True)
    two = project / "two.jsonl"
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [str(accelerate) if accelerate.exists() else shutil.which("accelerate"), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "magicme.cli", "evaluate-suite",
           "--subjects", str(project / "subjects.yaml"), "--results", str(two), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0/2" in proc.stderr and "process 1/2" in proc.stderr  # both processes did work
    a, b = _keyed(read_rows(one)), _keyed(read_rows(two))
    assert len(read_rows(two)) == 6 and a.keys() == b.keys()
    assert not list(project.glob("two.jsonl.part-*"))
    for key in a:
        for m in METRICS:  # rows score the saved GIFs: their palettes amplify the float noise of another thread count
            assert b[key][m] == pytest.approx(a[key][m], abs=2e-3), (key, m)
        assert {k: v for k, v in a[key].items() if k not in METRICS + ("video",)} == {
            k: v for k, v in b[key].items() if k not in METRICS + ("video",)
        }


def test_baseline_subject_without_identity(project):
    """Table 1's no-ID-module baselines: `identity: none`, plain class-word prompts, no token needed."""
    path = project / "subjects.yaml"
    doc = json.loads(path.read_text())
    doc["seeds"] = [0]
    doc["subjects"] = [{"name": "dog-sd", "identity": "none", "references": "refs", "class_word": "dog",
                        "prompts": ["a dog on the beach"]}]
    path.write_text(json.dumps(doc))
    results = project / "baseline.jsonl"
    run_suite(load_suite(path), results, device="cpu", quiet=True)
    [row] = read_rows(results)
    assert row["token"] is None and row["masked"] is None and row["identity"] is None
    assert row["scored_prompt"] == "a dog on the beach" and row["class_word"] == "dog"
    del doc["subjects"][0]["class_word"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="class word"):
        load_suite(path)


def _one_video(project):
    cfg = load_suite(project / "subjects.yaml", seeds=[0])
    cfg.subjects = cfg.subjects[:1]
    cfg.subjects[0] = type(cfg.subjects[0])(**{**cfg.subjects[0].__dict__, "prompts": cfg.subjects[0].prompts[:1]})
    return cfg


def test_the_suite_scores_the_saved_clip_as_evaluate_does(project, metric_models):
    """The row's metrics are `magicme evaluate` on the written file (GIF palette and all), not the frames
    before they were encoded."""
    from magicme.evaluate import MetricModels, Scorer, evaluate_video

    results = project / "results.jsonl"
    run_suite(_one_video(project), results, device="cpu", quiet=True)
    [row] = read_rows(results)
    scorer = Scorer(MetricModels(metric_models.clip, metric_models.dino), device="cpu")
    again = evaluate_video(project / row["video"], project / "refs", row["prompt"], identity=project / "dog.safetensors",
                           scorer=scorer)
    for m in METRICS:
        assert row[m] == pytest.approx(again[m], abs=1e-9), m


def test_device_and_dtype_are_part_of_the_configuration(project):
    """A results file written on one device or precision is not resumed on another (rows of both would mix)."""
    from magicme.suite import config_id

    cfg = _one_video(project)
    cpu, cuda = cfg.configuration("cpu"), cfg.configuration("cuda")
    assert (cpu["device"], cpu["dtype"], cpu["metrics_dtype"]) == ("cpu", "float32", "float32")
    assert (cuda["device"], cuda["dtype"], cuda["metrics_dtype"]) == ("cuda", "float16", "float16")
    results = project / "results.jsonl"
    run_suite(cfg, results, device="cpu", quiet=True)
    [row] = read_rows(results)
    assert row["config"]["device"] == "cpu" and row["config"]["dtype"] == "float32"
    row["config"] = {**row["config"], "device": "cuda", "dtype": "float16"}  # as if written on a GPU
    row["config_id"] = config_id(row["config"])
    results.write_text(json.dumps(row) + "\n")
    before = results.read_bytes()
    with pytest.raises(ValueError, match="another configuration.*device: 'cuda' there, 'cpu' now"):
        run_suite(cfg, results, device="cpu", quiet=True)
    bf16 = load_suite(project / "subjects.yaml", seeds=[0], dtype="bf16")
    assert bf16.configuration("cpu")["dtype"] == "bfloat16" and bf16.models.speed.dtype == "bf16"
    assert results.read_bytes() == before


def test_a_second_run_on_the_same_results_file_is_refused(project):
    from magicme.suite import _process_state, results_lock

    cfg = _one_video(project)
    results = project / "results.jsonl"
    lock = project / "results.jsonl.lock"
    with results_lock(results, _process_state("cpu")):  # another run holds the file
        assert f"pid {os.getpid()}" in lock.read_text()
        with pytest.raises(ValueError, match=r"in use by another evaluate-suite run \(pid \d+ on "):
            run_suite(cfg, results, device="cpu", quiet=True)
        assert not results.exists()
    assert not lock.exists()  # released and removed with the run
    run_suite(cfg, results, device="cpu", quiet=True)
    assert len(read_rows(results)) == 1 and not lock.exists()
