"""The web UI's model jobs: the models every workspace shares, a first-come, first-served queue, progress and cancel.

One model job runs at a time (a GPU holds one model); the others wait in arrival order and are told
how many jobs are ahead. A job reports progress through a callback and stops at its next step once
cancelled by its id; only its own workspace can cancel it.
"""

from __future__ import annotations

import copy
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_HINT = "give a hub id, a diffusers folder or a .safetensors checkpoint on the server, or 'tiny'"


class Cancelled(Exception):
    """The user cancelled the job."""


def stream(work: Callable[[Callable[..., None]], Any], poll: float = 0.1) -> Iterator[tuple[str, Any]]:
    """Run `work(report)` in a thread and yield ("progress", payload) for each `report(payload)`, then ("done", result).

    `work`'s exception is re-raised here. The caller (a web handler) can update its page between events.
    """
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            events.put(("done", work(lambda payload: events.put(("progress", payload)))))
        except BaseException as e:  # handed to the consuming thread, which re-raises it
            events.put(("error", e))

    thread = threading.Thread(target=run, daemon=True, name="magicme-job")
    thread.start()
    while True:
        try:
            kind, value = events.get(timeout=poll)
        except queue.Empty:
            continue
        if kind == "error":
            raise value
        yield kind, value
        if kind == "done":
            return


# ---- jobs


@dataclass(eq=False)  # identity-hashed: one entry per job
class Job:
    """One model job of one workspace; `id` is what its page cancels it by."""

    owner: str
    kind: str = "job"
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("cancelled")


class Runner:
    """The models and the job queue every workspace of one app shares: one model job runs at a time, in arrival order."""

    def __init__(self, device: str | None = None):
        self.device = device
        self._pipe: tuple | None = None  # (ModelSpec, pipeline): the last model used stays loaded; another replaces it
        self._scorers: dict = {}  # MetricModels → evaluate.Scorer
        self._segmenters: dict = {}  # SegmenterConfig → segment.Segmenter
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._running: Job | None = None
        self._jobs: dict[str, Job] = {}

    def new_job(self, owner: str, kind: str = "job") -> Job:
        job = Job(owner, kind)
        with self._cond:
            self._jobs[job.id] = job
        return job

    def run(self, job: Job, work: Callable[[Callable[[], None]], Any], report: Callable[[dict], None] = lambda _: None) -> Any:
        """Wait for the jobs queued before `job` (reporting {"queued": n ahead}), then run `work(job.check)`."""
        with self._cond:
            self._jobs[job.id] = job
            self._waiting.append(job)
            reported = None
            try:
                while (ahead := self._waiting.index(job) + (self._running is not None)) > 0:
                    job.check()
                    if ahead != reported:
                        report({"queued": ahead})
                        reported = ahead
                    self._cond.wait(timeout=1.0)
                job.check()
            except BaseException:  # cancelled while waiting: the jobs behind move up
                self._waiting.remove(job)
                self._jobs.pop(job.id, None)
                self._cond.notify_all()
                raise
            self._waiting.remove(job)
            self._running = job
        report({"running": True})
        try:
            return work(job.check)
        finally:
            with self._cond:
                self._running = None
                self._jobs.pop(job.id, None)
                self._cond.notify_all()

    def cancel(self, owner: str, job_id: str | None = None) -> int:
        """Cancel job `job_id` if `owner` owns it, or every job of `owner` without an id; return how many."""
        with self._cond:
            jobs = [j for j in self._jobs.values() if j.owner == owner and job_id in (None, j.id)]
            for job in jobs:
                job.cancelled.set()
            self._cond.notify_all()
        return len(jobs)

    def forget(self, job: Job) -> None:
        """Drop a job that never reached `run` (its request failed its checks)."""
        with self._cond:
            self._jobs.pop(job.id, None)

    # ---- models (call only from inside `run`)
    def pipeline(self, spec):
        """The AnimateDiff pipeline for `spec`: loaded once and kept until a job asks for another model."""
        from .models import load_pipeline

        if self._pipe is None or self._pipe[0] != spec:
            self._pipe = None  # free the old one before loading the next
            with unusable_models():
                self._pipe = (spec, load_pipeline(spec, device=self.device))
        return self._pipe[1]

    def scorer(self, metric_models, people: bool = False):
        """One Scorer per metric models for every set: with `--face-score auto`, it scores faces of people only
        (`people` says whether this set's class word names one, for the note when the [faces] extra is missing)."""
        from .evaluate import Scorer, resolve_face_score

        if metric_models not in self._scorers:
            face, people_only = resolve_face_score("auto", people=people)
            with unusable_models():
                self._scorers[metric_models] = Scorer(metric_models, device=self.device, face=face, face_people_only=people_only)
        return self._scorers[metric_models]

    def segmenter(self, seg_cfg):
        from .segment import Segmenter

        if seg_cfg not in self._segmenters:
            self._segmenters[seg_cfg] = Segmenter(seg_cfg)
        return self._segmenters[seg_cfg]


@contextmanager
def unusable_models():
    """A model path box's failure as "not a usable model", the same whether the path exists or not (no existence oracle)."""
    try:
        yield
    except (FileNotFoundError, ValueError, OSError) as e:
        field_name = model_field(str(e))
        if field_name is None:
            raise
        raise ValueError(f"{field_name}: not a usable model ({MODEL_HINT})") from None


def model_field(message: str) -> str | None:
    """The model box an error message is about, or None."""
    for prefix, label in (("base model", "Base model"), ("--base-config", "Base config"), ("--base ", "Base model"),
                          ("motion adapter", "Motion adapter"), ("--motion-adapter", "Motion adapter"),
                          ("--clip-model", "CLIP model"), ("--dino-model", "DINO model")):
        if message.lower().startswith(prefix):
            return label
    return None


@contextmanager
def identities_loaded(pipe, paths: list[Path]):
    """`pipe` with these identities (tokens; on Wan also LoRAs) for one job, and without them after: no job sees
    another's identities. A Wan token identity may write rows of UMT5's padded table past the tokenizer: with the
    tokenizer restored no prompt reaches them. A Wan LoRA stays loaded (by content hash) but is switched off."""
    from .identity import load_identities
    from .wan_identity import load_wan_identities
    from .wan_v2v import is_wan

    tokenizer = pipe.tokenizer
    rows = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    pipe.register_modules(tokenizer=copy.deepcopy(tokenizer))  # the job adds tokens to a copy
    try:
        if is_wan(pipe):
            load_wan_identities(pipe, list(paths))
        else:
            load_identities(pipe, list(paths))
        yield pipe
    finally:
        pipe.register_modules(tokenizer=tokenizer)
        if pipe.text_encoder.get_input_embeddings().weight.shape[0] != rows:
            pipe.text_encoder.resize_token_embeddings(rows)  # drops the added rows, keeps the others as they were
        if is_wan(pipe) and any(pipe.get_list_adapters().values()):
            pipe.disable_lora()


def latent_preview(pipe, latents, max_frames: int = 4):
    """A strip of up to `max_frames` evenly spaced frames of the current latents (B, C, F, h, w), VAE-decoded: (H, n·W, 3) uint8."""
    import numpy as np
    import torch

    from .wan_v2v import is_wan

    if is_wan(pipe):
        return wan_latent_preview(pipe, latents, max_frames)
    lat = latents[0]
    idx = np.unique(np.linspace(0, lat.shape[1] - 1, min(max_frames, lat.shape[1])).round().astype(int))
    idx = torch.as_tensor(idx, device=lat.device)
    with torch.no_grad():
        picked = lat[:, idx].permute(1, 0, 2, 3) / pipe.vae.config.scaling_factor
        images = pipe.vae.decode(picked.to(pipe.vae.device, pipe.vae.dtype)).sample
    images = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.concatenate(list(images), axis=1)


def wan_latent_preview(pipe, latents, max_frames: int = 4):
    """`latent_preview` on Wan: latents (B, C, F', h, w) normalised by the VAE's statistics; each picked latent frame
    is decoded alone (the causal VAE makes one frame of it, as of a clip's first), so a preview costs `max_frames` frames."""
    import numpy as np
    import torch

    from .wan import latent_statistics

    vae = pipe.vae
    lat = latents[:1].to(vae.device, vae.dtype)
    mean, std = latent_statistics(vae, lat.dtype, lat.device)
    idx = np.unique(np.linspace(0, lat.shape[2] - 1, min(max_frames, lat.shape[2])).round().astype(int))
    with torch.no_grad():
        images = [vae.decode(lat[:, :, i:i + 1] * std + mean).sample[0, :, 0] for i in idx]
    strip = torch.cat(images, dim=2)  # (3, H, n·W)
    return ((strip.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def step_reporter(report: Callable[[dict], None], check: Callable[[], None], total: int | None = None,
                  extra: dict | None = None, preview: Callable | None = None, preview_every: int = 0):
    """A diffusers `callback_on_step_end`: report the step count (and, every `preview_every` steps, `preview(latents)`), stop a cancelled job."""
    done = 0

    def on_step(pipe, step, timestep, kwargs):
        nonlocal done
        done += 1
        payload = {"step": done, **({"steps": total} if total is not None else {}), **(extra or {})}
        if preview is not None and preview_every and done % preview_every == 0 and done != total and "latents" in kwargs:
            payload["preview"] = preview(pipe, kwargs["latents"])
        report(payload)
        check()
        return kwargs

    return on_step
