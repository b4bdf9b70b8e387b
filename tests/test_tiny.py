"""The locally built encoders behave like real ones: distinct texts give distinct embeddings."""

import numpy as np


def test_tiny_text_model_tokenises_words(tiny_text):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_text), device="cpu")
    assert "[UNK]" not in model.tokenizer.tokenize("a red circle 42")
    a, b = model.encode(["a red circle", "a blue square"])
    assert np.abs(a - b).max() > 1e-3


def test_tiny_vision_model_shape(tiny_vision):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_vision)
    assert (cfg.model_type, cfg.hidden_size, cfg.image_size, cfg.patch_size) == ("dinov2", 32, 56, 14)
