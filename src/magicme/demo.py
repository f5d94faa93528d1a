"""`magicme demo`: the main job on the embedded tiny preset, offline, in seconds."""

from __future__ import annotations

from pathlib import Path

from .generate import GenerateConfig, generate
from .models import ModelSpec

DEMO_PROMPT = "a dog running on the beach at sunset"


def demo(out_dir: str | Path = "magicme-demo", quiet: bool = False) -> list[Path]:
    """Generate one clip with the tiny random-weight preset into `out_dir`; return what was written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = GenerateConfig(prompts=[DEMO_PROMPT], frames=16, steps=25, models=ModelSpec(base="tiny"))
    return generate(cfg, out_dir / "t2v.mp4", quiet=quiet)
