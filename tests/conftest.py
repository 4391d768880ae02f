"""Shared test setup: every test seeded; header names torch and the GPUs; `cuda` marker."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

import mplib.env


def pytest_report_header(config):
    return f"torch {torch.__version__}, CUDA GPUs: {torch.cuda.device_count()}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    mplib.env.seed_everything(0)
    yield
