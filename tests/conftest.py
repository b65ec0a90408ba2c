"""Shared fixtures: the read-only ../shared test data and the PyPI-shipped models (fetched once)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
QUANT_VECTORS = SHARED / "testdata" / "quant"
REFERENCE = SHARED / "testdata" / "reference"

# short name -> reference file stem in shared/testdata/reference
REFERENCE_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m",
}


@pytest.fixture(scope="session")
def model_path():
    """Returns a function: short name -> local GGUF path (downloaded and checked on first use)."""
    from vramfit.hub import pull

    return pull


@pytest.fixture(scope="session")
def metadata(model_path):
    """Returns a function: short name -> the model's GGUF metadata (read once per session)."""
    from vramfit.gguf import GGUFFile

    cache: dict[str, dict] = {}

    def get(name: str) -> dict:
        if name not in cache:
            with GGUFFile(model_path(name)) as g:
                cache[name] = dict(g.metadata)
        return cache[name]

    return get


def load_reference(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    stem = REFERENCE_MODELS[name]
    meta = json.loads((REFERENCE / f"{stem}.dev.json").read_text())
    arrays = dict(np.load(REFERENCE / f"{stem}.dev.npz"))
    return meta, arrays


def _hypothesis_profile() -> None:
    # Deterministic examples (CI must not flake on a new random draw) and no per-example deadline
    # (the machine is small and shared).
    from hypothesis import settings

    settings.register_profile("vramfit", derandomize=True, deadline=None)
    settings.load_profile("vramfit")


_hypothesis_profile()
