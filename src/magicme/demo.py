"""`magicme demo`: the main job on the embedded tiny preset, offline, in seconds.

The package draws a sample identity itself, writes a `magicme run` config for the tiny preset beside
it, and runs the whole chain: prepare → train → generate → face → upscale → evaluate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


DEMO_TOKEN = "<v*>"
DEMO_CLASS = "toy"
DEMO_PROMPT = f"a {DEMO_TOKEN} {DEMO_CLASS} running on the beach at sunset"


def sample_subject(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One photo of the sample identity, a little orange robot toy, on a varied background.

    Returns (image (size, size, 3) uint8, subject mask (size, size) bool); deterministic in `seed`.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    kind = seed % 3
    c0, c1 = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    if kind == 0:  # vertical gradient
        bg = c0 + (c1 - c0) * yy[..., None]
    elif kind == 1:  # stripes
        bg = np.where((np.floor(xx * rng.integers(4, 9)) % 2)[..., None] == 1, c0, c1)
    else:  # soft noise texture
        bg = c0 + rng.normal(0, 18, (size, size, 1))
    img = np.clip(bg, 0, 255) * np.ones((1, 1, 3))
    s = rng.uniform(0.55, 0.8)  # subject height as a share of the image
    cx, top = rng.uniform(0.35, 0.65), rng.uniform(0.08, 0.95 - s)
    head_r = 0.16 * s
    head = (xx - cx) ** 2 + (yy - (top + head_r)) ** 2 < head_r**2
    body = (np.abs(xx - cx) < 0.22 * s) & (yy > top + 1.8 * head_r) & (yy < top + 0.8 * s)
    legs = (np.abs(np.abs(xx - cx) - 0.11 * s) < 0.05 * s) & (yy >= top + 0.8 * s) & (yy < top + s)
    eyes = ((np.abs(xx - cx) - 0.06 * s) ** 2 + (yy - (top + head_r)) ** 2) < (0.03 * s) ** 2
    mask = head | body | legs
    img[mask] = (235, 120, 30)
    img[body & (np.abs(yy - (top + 0.5 * s)) < 0.04 * s)] = (60, 60, 200)  # a blue belt
    img[eyes] = (20, 20, 20)
    return img.round().astype(np.uint8), mask


def write_sample_identity(folder: str | Path, count: int = 4, size: int = 192) -> Path:
    """Write `count` PNG photos of the sample identity into `folder` (created)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img, _ = sample_subject(size, seed=i)
        Image.fromarray(img).save(folder / f"toy_{i}.png")
    return folder


def demo_config_text() -> str:
    """The `magicme run` config of the demo: the sample identity through every stage on the tiny preset."""
    import yaml

    config = {
        "images": "sample_identity",
        "class_word": DEMO_CLASS,
        "token": DEMO_TOKEN,
        "prompt": DEMO_PROMPT,
        "work_dir": ".",
        "models": {"base": "tiny"},
        "prepare": {"resolution": 128, "segmenter": {"method": "grabcut"}},
        "train": {"steps": 30, "batch_size": 2, "lr": 1e-2, "checkpoint_every": 15, "validation_steps": 5, "seed": 0},
        "generate": {"frames": 16, "steps": 25, "seeds": [42]},
        "face": {"steps": 10},
        "upscale": {"scale": 2, "steps": 10},
        "evaluate": {},
        "metric_models": {"clip": "tiny", "dino": "tiny"},  # random tiny CLIP/DINO, built offline: the real ones need the hub
    }
    return yaml.safe_dump(config, sort_keys=False)


def write_demo_config(out_dir: Path) -> Path:
    """Write the demo's run config (and the tiny metric models it names) into `out_dir`."""
    from .evaluate import save_tiny_metric_models

    if not (out_dir / "metric_models").is_dir():  # random tiny CLIP/DINO: the real ones need the hub
        save_tiny_metric_models(out_dir / "metric_models")
    path = out_dir / "magicme-run.yaml"
    path.write_text(demo_config_text())
    return path


def check_demo_dir(out_dir: Path) -> None:
    """The demo writes into a new or empty folder, or one an earlier demo made (its run config says so)."""
    from .outputs import check_writable

    if not out_dir.exists():
        if not out_dir.parent.is_dir():
            raise FileNotFoundError(f"--work-dir {str(out_dir)!r}: folder {str(out_dir.parent)!r} does not exist")
        return check_writable(out_dir.parent, "--work-dir", out_dir)
    if not out_dir.is_dir():
        raise FileExistsError(f"--work-dir {str(out_dir)!r} is a file; name a new folder")
    config = out_dir / "magicme-run.yaml"
    ours = config.is_file() and config.read_text(encoding="utf-8", errors="replace") == demo_config_text()
    if any(out_dir.iterdir()) and not ours:
        raise FileExistsError(f"--work-dir {str(out_dir)!r} is not empty and is not an earlier demo's folder; name a new folder")
    check_writable(out_dir, "--work-dir", out_dir)


def demo(out_dir: str | Path = "magicme-demo", quiet: bool = False) :
    """The whole chain (prepare → train → generate → face → upscale → evaluate) on the tiny preset in `out_dir`.

    A rerun skips every stage that is up to date. Returns the chain's `run.ChainResult` (outputs, stage times).
    """
    from .run import load_chain_config, run_chain

    out_dir = Path(out_dir)
    check_demo_dir(out_dir)
    out_dir.mkdir(exist_ok=True)
    write_sample_identity(out_dir / "sample_identity")
    config = write_demo_config(out_dir)
    return run_chain(load_chain_config(config), quiet=quiet, log=(lambda m: None) if quiet else print)
