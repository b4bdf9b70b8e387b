"""Randomly initialised encoders built from configs and saved locally: for the demo, tests and benchmarks.

Nothing is downloaded. The saved directories load through exactly the same code as real models
(`AutoModel` + `AutoImageProcessor`, `SentenceTransformer`).

    make_vision_model("/tmp/dino")                         # tiny DINOv2 (hidden 32, 2 layers)
    make_vision_model("/tmp/dino-s", shape="dinov2-s")     # dinov2-small's shape, random weights
    make_text_model("/tmp/bert")                           # tiny BERT wrapped as sentence-transformers
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

SHAPES = {
    # name: (hidden, layers, heads, mlp, image size, patch, processor short side)
    "tiny": (32, 2, 2, 64, 56, 14, 64),
    "demo": (192, 4, 3, 768, 112, 14, 128),
    "dinov2-s": (384, 12, 6, 1536, 224, 14, 256),
    "dinov2-l": (1024, 24, 16, 4096, 224, 14, 256),
}


def make_vision_model(path: str | Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Save a randomly initialised DINOv2 of the given shape, with an ImageNet-style processor."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    hidden, layers, heads, mlp, size, patch, short = SHAPES[shape]
    path = Path(path)
    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=mlp, image_size=size, patch_size=patch)
    Dinov2Model(cfg).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": short}, crop_size={"height": size, "width": size},
                      do_center_crop=True, resample=3, image_mean=[0.485, 0.456, 0.406],
                      image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


def make_text_model(path: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny random BERT with a character-level vocabulary as a sentence-transformers model."""
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    bert_dir = path / "_bert"
    bert_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits] + list(".,!?'-")
    (bert_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # `vocab=` (not `vocab_file=`, which some transformers versions silently ignore) so words are not [UNK]
    tok = BertTokenizerFast(vocab=str(bert_dir / "vocab.txt"), do_lower_case=True)
    if tok.vocab_size != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {tok.vocab_size} tokens, expected {len(vocab)}")
    tok.save_pretrained(bert_dir)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(bert_dir)
    word = models.Transformer(str(bert_dir), max_seq_length=64)
    dim = word.get_embedding_dimension() if hasattr(word, "get_embedding_dimension") else word.get_word_embedding_dimension()
    pool = models.Pooling(dim, pooling_mode="mean")
    SentenceTransformer(modules=[word, pool], device="cpu").save(str(path))
    return path
