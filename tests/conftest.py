from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.tiny_gguf import TINY_GEMMA3, TINY_LLAMA, write_tiny_model

_RUN_CACHE: list[str] = []


def pytest_configure(config):
    # Slices and assembled models go to a per-run cache unless the caller shares one.
    if "MESH_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["MESH_CACHE_DIR"] = tempfile.mkdtemp(prefix="mesh-test-cache-")
        _RUN_CACHE.append(os.environ["MESH_CACHE_DIR"])


def pytest_unconfigure(config):
    # A run's cache holds a 270 MB model and its slices: left behind, runs fill the disk.
    import shutil

    for path in _RUN_CACHE:
        shutil.rmtree(path, ignore_errors=True)
        os.environ.pop("MESH_CACHE_DIR", None)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", TINY_LLAMA)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gemma3.gguf", TINY_GEMMA3)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from mesh.model.source import resolve_model

    return resolve_model("default", progress=False)
