"""sail.data.augment: crops stay inside the image with the requested area and aspect, flips are exact mirrors,
tensors have the right layout and values, and everything is a function of the generator alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from sail.data.augment import (ImagePreprocessing, crop_box, hflip, random_resized_crop, resize_center_crop,
                          to_tensor)
from sail.core.errors import SailError


def _noise_image(w=80, h=60, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_crop_box_respects_bounds_area_and_aspect():
    scale, ratio = (0.3, 0.8), (0.75, 4 / 3)
    for seed in range(200):
        left, top, w, h = crop_box(200, 120, scale, ratio, _gen(seed))
        assert 0 <= left and 0 <= top and left + w <= 200 and top + h <= 120
        # w and h are rounded to whole pixels, so allow one pixel of slack on each
        area = w * h / (200 * 120)
        assert scale[0] * 0.97 <= area <= scale[1] * 1.03
        assert ratio[0] * 0.97 <= w / h <= ratio[1] * 1.03


def test_crop_box_falls_back_to_a_centred_box():
    # A 10:1 strip cannot hold a square of 90 % of its area: the fallback is the largest centred square.
    left, top, w, h = crop_box(1000, 100, (0.9, 1.0), (1.0, 1.0), _gen(0))
    assert (w, h) == (100, 100) and (left, top) == (450, 0)


def test_crop_box_positions_cover_the_image():
    lefts = {crop_box(100, 100, (0.25, 0.25), (1.0, 1.0), _gen(s))[0] for s in range(300)}
    assert min(lefts) <= 5 and max(lefts) >= 45  # 50-pixel box: left in [0, 50]


def test_random_resized_crop_is_the_box_resized():
    image = _noise_image()
    out = random_resized_crop(image, 32, (0.2, 0.6), (0.5, 2.0), _gen(7), "nearest")
    left, top, w, h = crop_box(image.width, image.height, (0.2, 0.6), (0.5, 2.0), _gen(7))
    expected = image.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.NEAREST)
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_hflip_is_an_exact_mirror():
    image = _noise_image(17, 9)
    a = np.asarray(image)
    assert np.array_equal(np.asarray(hflip(image)), a[:, ::-1])
    assert np.array_equal(np.asarray(hflip(hflip(image))), a)


def test_train_flip_is_the_mirror_of_the_same_crop():
    image = _noise_image()
    flip = ImagePreprocessing(size=24, scale=(0.3, 0.9), flip=True)
    plain = ImagePreprocessing(size=24, scale=(0.3, 0.9), flip=False)
    mirrored = same = 0
    for seed in range(40):
        a, b = flip.train(image, _gen(seed)), plain.train(image, _gen(seed))
        if torch.equal(a, b):
            same += 1
        else:
            assert torch.equal(a, b.flip(-1))  # (3, H, W): mirror along width
            mirrored += 1
    assert mirrored > 5 and same > 5  # p = 0.5


def test_to_tensor_layout_and_values():
    red = Image.new("RGB", (5, 3), (255, 0, 0))
    x = to_tensor(red)
    assert x.shape == (3, 3, 5) and x.dtype == torch.float32
    assert torch.equal(x[0], torch.ones(3, 5)) and torch.equal(x[1:], torch.zeros(2, 3, 5))
    image = _noise_image(8, 6)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    y = to_tensor(image, mean, std)
    raw = np.asarray(image, np.float32) / 255.0
    ref = (raw - np.array(mean, np.float32)) / np.array(std, np.float32)  # plain per-channel formula
    assert np.allclose(y.permute(1, 2, 0).numpy(), ref, atol=1e-6)
    assert 0.0 <= to_tensor(image).min() and to_tensor(image).max() <= 1.0


def test_resize_center_crop_keeps_the_middle():
    image = _noise_image(120, 60)
    a = np.asarray(image)
    # short side already 60: no resize, only the centred 30 x 30 crop (left 45, top 15)
    out = resize_center_crop(image, 30, resize=60)
    assert np.array_equal(np.asarray(out), a[15:45, 45:75])
    # short side 60 -> 40 (width 80), then the centred 30 x 30 of that
    out = resize_center_crop(image, 30, resize=40, interpolation="nearest")
    resized = np.asarray(image.resize((80, 40), Image.Resampling.NEAREST))
    assert np.array_equal(np.asarray(out), resized[5:35, 25:55])
    assert resize_center_crop(_noise_image(50, 90), 32).size == (32, 32)  # portrait, default resize = size


def test_eval_is_deterministic_and_train_depends_only_on_the_generator():
    pre = ImagePreprocessing(size=32, resize=36, scale=(0.5, 1.0), flip=True)
    image = _noise_image()
    assert torch.equal(pre.eval(image), pre.eval(image))
    assert pre.eval(image).shape == (3, 32, 32)
    assert torch.equal(pre.train(image, _gen(3)), pre.train(image, _gen(3)))
    assert not torch.equal(pre.train(image, _gen(3)), pre.train(image, _gen(4)))
    lo = (0 - max(pre.mean)) / min(pre.std)
    hi = (1 - min(pre.mean)) / min(pre.std)
    x = pre.train(image, _gen(5))
    assert lo - 1e-6 <= x.min() and x.max() <= hi + 1e-6


def test_preprocessing_round_trip_and_validation():
    pre = ImagePreprocessing(size=64, resize=72, scale=(0.7, 0.7), ratio=(1.0, 1.0), flip=True,
                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")
    d = pre.to_dict()
    assert d["scale"] == [0.7, 0.7] and d["flip"] is True
    assert ImagePreprocessing.from_dict(d) == pre
    with pytest.raises(SailError, match="unknown image preprocessing"):
        ImagePreprocessing.from_dict({"size": 32, "colour": 1})
    for bad in ({"scale": (0.0, 1.0)}, {"scale": (0.9, 0.5)}, {"std": (1, 0, 1)}, {"size": 0},
                {"interpolation": "lanczos9"}):
        with pytest.raises(SailError):
            ImagePreprocessing(**bad)


def test_log_uniform_aspect():
    # aspect ratios are log-uniform: as many crops wider than square as taller, for a symmetric range
    boxes = [crop_box(400, 400, (0.1, 0.1), (0.5, 2.0), _gen(s)) for s in range(400)]
    wide = sum(w > h for _, _, w, h in boxes)
    assert 150 < wide < 250
