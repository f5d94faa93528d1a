"""The web UI's job queue, cancel-by-id, per-job identities and the live preview, on the tiny preset."""

import threading

import numpy as np
import pytest
import torch

from magicme.identity import IdentityInfo, save_identity
from magicme.models import ModelSpec
from magicme.runner import Cancelled, Runner, identities_loaded, latent_preview, step_reporter, stream, unusable_models


def test_stream_yields_progress_then_result_and_reraises():
    assert list(stream(lambda report: [report(i) for i in range(3)] and "ok")) == [
        ("progress", 0), ("progress", 1), ("progress", 2), ("done", "ok")]

    def fail(report):
        report("x")
        raise ValueError("boom")

    gen = stream(fail)
    assert next(gen) == ("progress", "x")
    with pytest.raises(ValueError, match="boom"):
        next(gen)


def wait_until(condition, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        threading.Event().wait(0.01)
    raise AssertionError("timed out")


def test_jobs_run_one_at_a_time_in_arrival_order_and_say_how_many_are_ahead():
    runner = Runner("cpu")
    gates = {name: threading.Event() for name in ("first", "second", "third")}
    order, reports, threads = [], {}, []

    def work(name):
        def run(check):
            order.append(name)
            gates[name].wait(10)
        return run

    for name in ("first", "second", "third"):
        job = runner.new_job(name)
        reports[name] = []
        threads.append(threading.Thread(target=runner.run, args=(job, work(name), reports[name].append)))
        threads[-1].start()
        wait_until(lambda: runner._running is job or job in runner._waiting)
    gates["first"].set()
    wait_until(lambda: {"queued": 1} in reports["third"])
    gates["second"].set()
    gates["third"].set()
    for t in threads:
        t.join(10)
    assert order == ["first", "second", "third"]
    assert reports["first"] == [{"running": True}]
    assert reports["second"] == [{"queued": 1}, {"running": True}]
    assert reports["third"] == [{"queued": 2}, {"queued": 1}, {"running": True}]


def test_cancel_by_id_only_reaches_the_owners_job_and_a_waiting_job_leaves_the_queue():
    runner = Runner("cpu")
    gate = threading.Event()
    running = runner.new_job("alice")
    waiting = runner.new_job("alice")
    other = runner.new_job("bob")
    results = {}

    def run(job, key, work):
        try:
            results[key] = runner.run(job, work)
        except Cancelled:
            results[key] = "cancelled"

    def busy(check):
        while not gate.is_set():
            check()
            threading.Event().wait(0.01)
        return "finished"

    threads = [threading.Thread(target=run, args=(running, "running", busy))]
    threads[0].start()
    wait_until(lambda: runner._running is running)
    threads.append(threading.Thread(target=run, args=(waiting, "waiting", lambda check: "ran")))
    threads[1].start()
    wait_until(lambda: waiting in runner._waiting)
    assert runner.cancel("bob", running.id) == 0  # another workspace cannot cancel it, even knowing its id
    assert runner.cancel("alice", other.id) == 0
    assert runner.cancel("alice", waiting.id) == 1
    threads[1].join(10)
    assert results["waiting"] == "cancelled" and waiting not in runner._waiting
    gate.set()
    threads[0].join(10)
    assert results["running"] == "finished"
    assert runner.run(other, lambda check: "bob's job") == "bob's job"


def identity(path, token, seed, hidden=32):
    emb = torch.randn(2, hidden, generator=torch.Generator().manual_seed(seed))
    return save_identity(path, emb, IdentityInfo(token=token, class_word="dog", num_vectors=2, base="tiny")), emb


def test_a_job_sees_its_identities_and_no_job_sees_another_jobs(tmp_path):
    runner = Runner("cpu")
    pipe = runner.pipeline(ModelSpec())
    assert runner.pipeline(ModelSpec()) is pipe  # loaded once
    before = (len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.detach().clone())
    first, emb1 = identity(tmp_path / "a.safetensors", "<re>", 1)
    second, emb2 = identity(tmp_path / "b.safetensors", "<re>", 2)  # retrained under the same token
    for path, emb in ((first, emb1), (second, emb2)):
        with identities_loaded(pipe, [path]):
            ids = pipe.tokenizer.convert_tokens_to_ids(["<re>", "<re>_1"])
            assert torch.allclose(pipe.text_encoder.get_input_embeddings().weight[ids], emb)
        assert "<re>" not in pipe.tokenizer.get_vocab()
        assert len(pipe.tokenizer) == before[0]
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before[1])
    assert runner.pipeline(ModelSpec(scheduler="euler")) is not pipe  # another model replaces it


def test_live_preview_is_the_vae_decode_of_the_current_latents(tiny_pipe):
    latents = torch.randn(1, 4, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    strip = latent_preview(tiny_pipe, latents, max_frames=4)
    assert strip.shape == (64, 4 * 64, 3) and strip.dtype == np.uint8
    # the reference: diffusers' own decode of the whole clip, frames 0, 2, 3, 5 (evenly spaced)
    video = tiny_pipe.decode_latents(latents)  # (B, C, F, H, W) in [-1, 1]
    expected = ((video[0][:, [0, 2, 3, 5]].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    expected = np.concatenate(list(expected.permute(1, 2, 3, 0).numpy()), axis=1)
    assert np.abs(strip.astype(int) - expected.astype(int)).max() <= 1


def test_step_reporter_previews_every_n_steps_but_not_the_last_and_stops_a_cancelled_job():
    reports, cancelled = [], threading.Event()

    def check():
        if cancelled.is_set():
            raise Cancelled

    on_step = step_reporter(reports.append, check, total=5, extra={"clip": 1}, preview=lambda pipe, lat: "frames", preview_every=2)
    for step in range(5):
        on_step(None, step, 0, {"latents": None})
    assert [r.get("preview") for r in reports] == [None, "frames", None, "frames", None]
    assert reports[0] == {"step": 1, "steps": 5, "clip": 1}
    cancelled.set()
    with pytest.raises(Cancelled):
        on_step(None, 5, 0, {"latents": None})


@pytest.mark.parametrize("message, field", [
    ("base model '/x' not found: no such file or folder. Give a hub id", "Base model"),
    ("base model '/etc' not found: the local folder is not a readable diffusers model (x)", "Base model"),
    ("--base '/a.safetensors': could not read the checkpoint", "Base model"),
    ("motion adapter '/y' not found", "Motion adapter"),
    ("--clip-model '/z' could not be loaded (x)", "CLIP model"),
])
def test_model_failures_read_the_same_whatever_the_path_holds(message, field):
    with pytest.raises(ValueError) as e:
        with unusable_models():
            raise FileNotFoundError(message)
    assert str(e.value).startswith(f"{field}: not a usable model (") and "/" not in str(e.value).split("(")[0]
    with pytest.raises(ValueError, match="--steps"):  # other errors pass unchanged
        with unusable_models():
            raise ValueError("--steps must be an integer")
