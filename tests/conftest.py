"""Shared pytest fixtures: where the reference fixtures live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _fixtures_root() -> Path:
    """``$NEXTSTEP_FIXTURES`` if set, else the reference data bundled in ``tests/fixtures``."""
    env = os.environ.get("NEXTSTEP_FIXTURES")
    return Path(env) if env else Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The reference fixtures directory (read-only). Missing fixtures fail the test: they are part of the repository,
    so a skip could only hide every parity test."""
    root = _fixtures_root()
    if not (root / "official-v1-a").is_dir():
        pytest.fail(f"reference fixtures not found at {root} (they ship in tests/fixtures; "
                    f"NEXTSTEP_FIXTURES overrides)")
    return root


@pytest.fixture(scope="session")
def fixture(fixtures_dir) -> Path:
    """The official-format tiny model with its reference outputs (``official-v1-a``)."""
    return fixtures_dir / "official-v1-a"


@pytest.fixture(scope="module")
def fixture_pipe(fixture):
    """The official-format tiny model as a pipeline, one per test module (tests may change its state)."""
    from nextstep.pipeline import NextStepPipeline

    return NextStepPipeline.from_pretrained(fixture / "model", fixture / "vae")


@pytest.fixture(scope="module")
def bundled_pipe():
    """The bundled shapes model as a pipeline, one per test module (tests may change its state)."""
    from nextstep.pipeline import NextStepPipeline, bundled_model_dir

    if bundled_model_dir() is None:
        pytest.fail("the package ships no bundled model")
    return NextStepPipeline.from_pretrained()


@pytest.fixture(scope="session")
def ref(fixture) -> dict:
    """Inputs and outputs of the official implementation (``reference.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(fixture / "reference.safetensors"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_process():
    """Tiny models on two cores: several threads per matrix product only contend (the bundled-model test took ~85 s
    with the default threads and ~3 s with one). Subprocesses inherit it through OMP_NUM_THREADS."""
    import torch

    n = torch.get_num_threads()
    old = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(n)
    if old is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture
def one_thread():
    """The fixtures were computed with one thread; reductions split over threads round differently. (Every test
    runs with one thread already; parity tests name this fixture to say that they depend on it.)"""
    import torch

    assert torch.get_num_threads() == 1
    yield
