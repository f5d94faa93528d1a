"""Progress bars: one labelled bar per stage, counting the stage's whole work, with an ETA.

A stage that runs several denoising calls (seeds, face tracks, tile batches, windows) counts every
denoising step of all of them on one bar, advanced by the pipeline's `callback_on_step_end`, instead
of diffusers' unlabelled per-call bars. Bars draw only on a terminal and never with `quiet`.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable


def progress_bar(total: int | None, desc: str, *, quiet: bool = False, unit: str = "step", initial: int = 0):
    """A tqdm bar on stderr labelled `desc`; disabled when `quiet` or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=quiet or not on_terminal(), dynamic_ncols=True)


def on_terminal() -> bool:
    """Whether stderr is a terminal (bars in a log file are noise)."""
    return sys.stderr.isatty()


def step_counter(bar, then: Callable | None = None) -> Callable:
    """A diffusers `callback_on_step_end` that advances `bar` by one step, then calls `then` (which may raise to stop)."""

    def on_step(pipe, step, timestep, kwargs):
        bar.update(1)
        return then(pipe, step, timestep, kwargs) if then is not None else kwargs

    return on_step


def denoising_steps(steps: int, strength: float = 1.0) -> int:
    """Steps one (partial) denoising call runs: int(steps × strength), as diffusers' `get_timesteps` cuts the schedule."""
    return min(int(steps * strength), steps)


@contextlib.contextmanager
def library_bars_off():
    """No 'Loading weights' / 'Loading pipeline components' / download bars from the libraries either."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # and huggingface_hub's
    try:
        yield
    finally:  # as they were (main() may run again in the same process)
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()
        (disable_progress_bars if was[2] else enable_progress_bars)()
