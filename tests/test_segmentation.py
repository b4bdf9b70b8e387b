"""Sliding-window segmentation protocol (sail.eval.segmentation) and mask reading, against hand computations."""

import numpy as np
import pytest
import torch
from PIL import Image

from sail.core.errors import SailError
from sail.eval.evalsets import load_mask, load_segmentation_classes
from sail.eval.segmentation import SegProtocol, resize_for_protocol, slide_logits, window_boxes


def test_window_boxes_by_hand():
    # 5 x 7 image, 4 px windows every 2 px: rows start 0, then 2 pushed back to 1 (ends at 5);
    # columns start 0, 2, then 4 pushed back to 3 (ends at 7).
    assert window_boxes(5, 7, 4, 2) == [(y1, x1, y1 + 4, x1 + 4) for y1 in (0, 1) for x1 in (0, 2, 3)]
    # smaller than the window: one window the size of the image
    assert window_boxes(3, 10, 4, 4) == [(0, 0, 3, 4), (0, 4, 3, 8), (0, 6, 3, 10)]
    # the SAIL default on a 448 x 597 image: one row, three columns (0, 224 -> 149)
    assert window_boxes(448, 597, 448, 224) == [(0, 0, 448, 448), (0, 149, 448, 597)]


def test_window_boxes_cover_every_pixel_property():
    for h in range(1, 40):
        for w in range(1, 40, 3):
            for window in range(1, 20, 2):
                for stride in range(1, window + 1, 2):
                    boxes = window_boxes(h, w, window, stride)
                    cover = np.zeros((h, w), int)
                    for y1, x1, y2, x2 in boxes:
                        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
                        assert (y2 - y1, x2 - x1) == (min(window, h), min(window, w))
                        cover[y1:y2, x1:x2] += 1
                    assert cover.min() >= 1, (h, w, window, stride)
                    # starts are multiples of the stride except the last one, which ends at the border
                    ys = sorted({b[0] for b in boxes})
                    assert all(y % stride == 0 for y in ys[:-1]) and max(b[2] for b in boxes) == h
                    assert len(ys) == (max(h - window, 0) + stride - 1) // stride + 1


def test_slide_logits_identity_and_overlap_average():
    torch.manual_seed(0)
    pixels = torch.randn(3, 9, 13)
    # a "model" that returns its input: averaging overlapping windows gives the image back, also when
    # windows must be padded to a multiple of the patch size (window 5, patch 4 -> padded to 8)
    same = slide_logits(pixels, window=5, stride=3, patch=4, window_logits=lambda x: x)
    assert torch.allclose(same, pixels, atol=1e-6)
    seen = []

    def window_id(x):  # each window's logits: one channel, the window's index everywhere
        seen.append(tuple(x.shape))
        return torch.arange(len(x), dtype=torch.float32)[:, None, None, None].expand(len(x), 1, *x.shape[2:])

    out = slide_logits(torch.zeros(3, 3, 5), window=3, stride=2, patch=1, window_logits=window_id)
    assert seen == [(2, 3, 3, 3)]  # windows (0,0)-(3,3) and (0,2)-(3,5), batched
    # columns 0-1 only window 0, column 2 both (mean 0.5), columns 3-4 only window 1
    assert torch.equal(out[0], torch.tensor([[0, 0, 0.5, 1, 1]] * 3))


def test_resize_matches_mmseg_keep_ratio():
    assert resize_for_protocol((500, 375), 448, 2048) == (597, 448)  # VOC-like: short side to 448
    assert resize_for_protocol((4000, 100), 448, 2048) == (2048, 51)  # long side capped
    assert resize_for_protocol((64, 64), 0, 2048) == (64, 64)
    with pytest.raises(SailError, match="stride"):
        SegProtocol(window=10, stride=11).check()


def test_reduce_zero_label_by_hand(tmp_path):
    raw = np.array([[0, 1, 2], [150, 255, 3]], np.uint8)
    Image.fromarray(raw).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").tolist() == raw.tolist()
    assert load_mask(tmp_path / "m.png", reduce_zero_label=True).tolist() == [[255, 0, 1], [149, 255, 2]]
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(SailError, match="not a label mask"):
        load_mask(tmp_path / "rgb.png")


def test_class_file_synonyms(tmp_path):
    (tmp_path / "c.txt").write_text("background\ncar, auto\nperson\n")
    assert load_segmentation_classes(str(tmp_path / "c.txt")) == (["background", "car", "auto", "person"], [0, 1, 1, 2])
