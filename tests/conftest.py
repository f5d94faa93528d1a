"""Shared fixtures: the tiny preset, built once per session (offline, seeded)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

# diffusers/transformers bind their log handler to the sys.stderr of first use; make that pytest's
# session-long stream, not a capsys stream that a test closes (later warnings would then fail to print)
from diffusers.utils import logging as _diffusers_logging  # noqa: E402
from transformers.utils import logging as _transformers_logging  # noqa: E402

_diffusers_logging.get_logger("diffusers")
_transformers_logging.get_logger("transformers")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow (long or GPU-only)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipe():
    """A CPU AnimateDiffPipeline on the tiny preset (shared: tests must not load identities into it)."""
    from magicme.models import ModelSpec, load_pipeline

    pipe = load_pipeline(ModelSpec(base="tiny"), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny preset saved as a stock diffusers folder (+ motion_adapter/)."""
    from magicme.models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared identity set of the drawn sample identity (3 photos, 64 px, GrabCut masks), shared per test file."""
    from magicme.demo import write_sample_identity
    from magicme.prepare import PrepareConfig, prepare_identity_set
    from magicme.segment import SegmenterConfig

    root = tmp_path_factory.mktemp("identity")
    photos = write_sample_identity(root / "photos", count=3, size=96)
    return prepare_identity_set(
        PrepareConfig(images=photos, class_word="toy", out=root / "prepared", resolution=64, segmenter=SegmenterConfig(method="grabcut"))
    )
