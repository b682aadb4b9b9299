"""Shared test fixtures: paths of the conformance fixtures and small models built from the tiny preset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    env = os.environ.get("JANUSKIT_SHARED")
    if env:
        return Path(env)
    for parent in [ROOT, *ROOT.parents]:
        cand = parent / "shared" / "fixtures"
        if cand.is_dir():
            return cand.parent
    return ROOT.parent / "shared"


SHARED = _find_shared()
FIXTURES = SHARED / "fixtures"
OFFICIAL_TINY = FIXTURES / "janus-official-tiny"


@pytest.fixture(scope="session")
def official_tiny_dir() -> Path:
    assert OFFICIAL_TINY.is_dir(), f"conformance fixture missing: {OFFICIAL_TINY} (set JANUSKIT_SHARED)"
    return OFFICIAL_TINY


@pytest.fixture(scope="session")
def reference(official_tiny_dir):
    from safetensors.torch import load_file

    return {
        "json": json.loads((official_tiny_dir / "reference_outputs.json").read_text()),
        "tensors": load_file(str(official_tiny_dir / "reference_outputs.safetensors")),
    }


@pytest.fixture(scope="session")
def official_janus(official_tiny_dir):
    from januskit import Janus

    return Janus.from_pretrained(official_tiny_dir, device="cpu", dtype=torch.float32)


@pytest.fixture
def tiny_model():
    from januskit.config import preset
    from januskit.weights import build_on_meta, init_weights

    torch.manual_seed(0)
    return init_weights(build_on_meta(preset("tiny")), seed=0).eval()


@pytest.fixture(scope="session")
def tiny_processor():
    """The fixture's tokenizer (vocab < 512) with the tiny preset's image geometry: 64 px, 16 image tokens."""
    from januskit.processor import JanusProcessor

    return JanusProcessor.from_pretrained(OFFICIAL_TINY, num_image_tokens=16, image_size=64)


@pytest.fixture
def tiny_janus(tiny_model, tiny_processor):
    from januskit import Janus

    return Janus(tiny_model, tiny_processor)
