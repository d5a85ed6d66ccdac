"""Shared test set-up: nothing may reach a model or data hub, and models load once per session."""

import os

import pytest

# The kit's defaults are local; a test that tried the hub would fail here rather than hang.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_checkpoint():
    """The embedded model converted to safetensors (fetched and converted on first use)."""
    from humpback_nb.infra.models import embedded_checkpoint

    return embedded_checkpoint("smollm2-135m")
