"""Tests for sail.core.metrics: every metric against a plain loop / python-set reference on small inputs."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sail.core import metrics
from sail.core.errors import SailError


def unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def first_correct_position(scores, correct):
    """Position of the first correct item in a list sorted by score, wrong items first among equals."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j in correct))
    return next(pos for pos, j in enumerate(order) if j in correct)


# ---------------------------------------------------------------------------------------------------
# retrieval


def reference_retrieval(img, txt, owner, ks):
    img, txt = img.tolist(), txt.tolist()
    dot = lambda u, v: sum(a * b for a, b in zip(u, v))
    i2t, t2i = [], []
    for i, u in enumerate(img):
        scores = [dot(u, v) for v in txt]
        i2t.append(first_correct_position(scores, {j for j, o in enumerate(owner) if o == i}))
    for j, v in enumerate(txt):
        scores = [dot(u, v) for u in img]
        t2i.append(first_correct_position(scores, {owner[j]}))
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * sum(r < k for r in i2t) / len(i2t)
        out[f"text_to_image_R@{k}"] = 100.0 * sum(r < k for r in t2i) / len(t2i)
    return out


def shuffled_owners(n_img, caps_per_image, seed):
    owner = [i for i in range(n_img) for _ in range(caps_per_image)]
    np.random.default_rng(seed).shuffle(owner)
    return owner


@pytest.mark.parametrize("chunk_size", [3, 4096])
def test_retrieval_matches_reference_with_several_captions(chunk_size):
    img, owner = unit(12, 8, 0), shuffled_owners(12, 3, 0)
    # captions near their image so recall is neither 0 nor 100
    txt = F.normalize(img[owner] + 0.9 * unit(36, 8, 1), dim=-1)
    ks = (1, 2, 5, 10)
    got = metrics.retrieval(img, txt, owner, ks=ks, chunk_size=chunk_size)
    want = reference_retrieval(img, txt, owner, ks)
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < got["image_to_text_R@1"] < 100 and 0 < got["text_to_image_R@1"] < 100
    assert all(type(v) is float for v in got.values())


def test_retrieval_uneven_captions_numpy_and_ties():
    # Entries in {-1, 0, 1}: many exact ties; uneven caption counts; numpy inputs; small chunks.
    rng = np.random.default_rng(3)
    img = rng.integers(-1, 2, size=(9, 3)).astype(np.float32)
    owner = np.array(list(range(9)) + list(rng.integers(0, 9, size=14)))
    txt = rng.integers(-1, 2, size=(len(owner), 3)).astype(np.float32)
    ks = (1, 3, 5)
    got = metrics.retrieval(img, txt, owner, ks=ks, chunk_size=4)
    assert got == pytest.approx(reference_retrieval(img, txt, owner.tolist(), ks), abs=1e-9)


def test_retrieval_constant_embeddings_give_zero():
    img, txt = torch.ones(5, 4), torch.ones(10, 4)
    got = metrics.retrieval(img, txt, [i // 2 for i in range(10)], ks=(1, 4))
    assert got == {"image_to_text_R@1": 0.0, "text_to_image_R@1": 0.0,
                   "image_to_text_R@4": 0.0, "text_to_image_R@4": 0.0}


def test_retrieval_perfect_match_is_100():
    img = torch.eye(4)
    got = metrics.retrieval(img, torch.cat([img, img]), [0, 1, 2, 3, 0, 1, 2, 3], ks=(1,))
    assert got == {"image_to_text_R@1": 100.0, "text_to_image_R@1": 100.0}


def test_retrieval_errors():
    img, txt = unit(4, 8, 0), unit(6, 8, 1)
    with pytest.raises(SailError, match="no caption"):
        metrics.retrieval(img, txt, [0, 0, 1, 1, 2, 2])
    with pytest.raises(SailError, match="only 4 rows"):
        metrics.retrieval(img, txt, [0, 1, 2, 3, 4, 0])
    with pytest.raises(SailError, match="dim"):
        metrics.retrieval(img, unit(6, 5, 1), [0, 1, 2, 3, 0, 1])
    with pytest.raises(SailError, match="6 entries"):
        metrics.retrieval(img, txt, [0, 1, 2, 3])
    bad = img.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(SailError, match="NaN"):
        metrics.retrieval(bad, txt, [0, 1, 2, 3, 0, 1])


# ---------------------------------------------------------------------------------------------------
# zero-shot


def reference_zeroshot(img, cls, labels, ks):
    ranks = [first_correct_position([float(u @ c) for c in cls], {y}) for u, y in zip(img, labels)]
    out = {f"top{k}": 100.0 * sum(r < k for r in ranks) / len(ranks) for k in ks}
    per_class = {}
    for r, y in zip(ranks, labels):
        per_class.setdefault(y, []).append(r == 0)
    out["mean_per_class_recall"] = 100.0 * sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    return out


def test_zeroshot_matches_reference_with_missing_classes():
    cls = unit(7, 6, 0)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 4] * 3  # classes 3, 5, 6 never appear
    img = F.normalize(cls[labels] + 1.0 * unit(len(labels), 6, 1), dim=-1)
    got = metrics.zeroshot(img, cls, labels, ks=(1, 2, 5), chunk_size=7)
    assert got == pytest.approx(reference_zeroshot(img, cls, labels, (1, 2, 5)), abs=1e-9)
    assert 0 < got["top1"] < 100
    # balanced top-1 differs from plain top-1 here, so the two are computed differently
    assert got["mean_per_class_recall"] != pytest.approx(got["top1"])


def test_zeroshot_ties_and_k_clamp():
    rng = np.random.default_rng(5)
    cls = rng.integers(-1, 2, size=(3, 2)).astype(np.float64)
    img = rng.integers(-1, 2, size=(20, 2)).astype(np.float64)
    labels = rng.integers(0, 3, size=20)
    got = metrics.zeroshot(img, cls, labels)
    assert got == pytest.approx(reference_zeroshot(img, cls, labels.tolist(), (1, 5)), abs=1e-9)
    assert got["top5"] == 100.0  # only 3 classes
    const = metrics.zeroshot(np.ones((4, 2)), np.ones((3, 2)), [0, 1, 2, 0], ks=(1, 2))
    assert const == {"top1": 0.0, "top2": 0.0, "mean_per_class_recall": 0.0}


def test_zeroshot_label_out_of_range():
    with pytest.raises(SailError, match="only 3 rows"):
        metrics.zeroshot(unit(2, 4, 0), unit(3, 4, 1), [0, 3])


# ---------------------------------------------------------------------------------------------------
# class embeddings


class FakeTextEncoder:
    """Deterministic random vector per prompt; records how many calls were made."""

    def __init__(self, dim=5):
        self.dim, self.table, self.calls = dim, {}, 0

    def vector(self, prompt):
        if prompt not in self.table:
            self.table[prompt] = torch.randn(self.dim, generator=torch.Generator().manual_seed(len(self.table)))
        return self.table[prompt]

    def __call__(self, prompts):
        self.calls += 1
        return torch.stack([self.vector(p) for p in prompts]) * 3.0  # not normalised on purpose


def test_class_embeddings_matches_reference_and_batches():
    enc = FakeTextEncoder()
    classnames, templates = ["cat", "dog", "red fox"], ["a photo of a {}.", "a {c} in {{braces}}", "{}"]
    got = metrics.class_embeddings(enc, classnames, templates)
    assert got.shape == (3, 5) and enc.calls == 1
    assert enc.table.keys() >= {"a photo of a red fox.", "a cat in {{braces}}", "dog"}
    for i, c in enumerate(classnames):
        prompts = [t.replace("{c}", c).replace("{}", c) for t in templates]
        vecs = [enc.vector(p) / enc.vector(p).norm() for p in prompts]
        mean = sum(vecs) / len(vecs)
        assert torch.allclose(got[i], mean / mean.norm(), atol=1e-6)
    enc2 = FakeTextEncoder()
    enc2.table = enc.table
    assert torch.allclose(metrics.class_embeddings(enc2, classnames, templates, batch_size=4), got)
    assert enc2.calls == 3  # 9 prompts in batches of 4


def test_class_embeddings_template_without_placeholder():
    with pytest.raises(SailError, match="placeholder"):
        metrics.class_embeddings(FakeTextEncoder(), ["cat"], ["a photo of a {}.", "a photo"])


# ---------------------------------------------------------------------------------------------------
# winoground


def test_winoground_matches_reference():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(200, 2, 2)).astype(float)  # many ties
    text = image = group = 0
    for s in scores:
        # s[i, j] = sim(image_i, caption_j); paper notation s(c_j, i_i)
        t = s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0]
        im = s[0, 0] > s[1, 0] and s[1, 1] > s[0, 1]
        text, image, group = text + t, image + im, group + (t and im)
    got = metrics.winoground(torch.from_numpy(scores))
    assert got == pytest.approx({"text": text / 2, "image": image / 2, "group": group / 2})
    assert got["text"] != got["image"]


def test_winoground_asymmetric_case():
    # image 0 prefers caption 0 and image 1 prefers caption 1 (text correct), but caption 1 is
    # closer to image 0 than to image 1 (image wrong).
    s = torch.tensor([[[0.9, 0.8], [0.1, 0.5]]])
    assert metrics.winoground(s) == {"text": 100.0, "image": 0.0, "group": 0.0}
    with pytest.raises(SailError, match="2, 2"):
        metrics.winoground(torch.zeros(3, 2, 3))


# ---------------------------------------------------------------------------------------------------
# kNN


def reference_knn(train, y_train, test, y_test, k, temperature):
    n_classes = max(max(y_train), max(y_test)) + 1
    top1 = top5 = 0
    for u, y in zip(test, y_test):
        sims = sorted(((float(u @ v), j) for j, v in enumerate(train)), key=lambda t: -t[0])[:k]
        votes = [0.0] * n_classes
        for s, j in sims:
            votes[y_train[j]] += math.exp(s / temperature)
        rank = first_correct_position(votes, {y})
        top1, top5 = top1 + (rank < 1), top5 + (rank < 5)
    return {"top1": 100.0 * top1 / len(test), "top5": 100.0 * top5 / len(test)}


def test_knn_matches_reference():
    centres = unit(8, 16, 0)
    y_train = [i % 8 for i in range(120)]
    y_test = [(3 * i) % 8 for i in range(40)]
    train = F.normalize(centres[y_train] + 0.8 * unit(120, 16, 1), dim=-1)
    test = F.normalize(centres[y_test] + 0.8 * unit(40, 16, 2), dim=-1)
    got = metrics.knn_classify(train, y_train, test, y_test, k=10, temperature=0.1)
    want = reference_knn(train, y_train, test, y_test, 10, 0.1)
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < got["top1"] < got["top5"] <= 100
    per_k = metrics.knn_sweep(train.numpy(), np.array(y_train), test, y_test, ks=[1, 5, 20])
    assert set(per_k) == {1, 5, 20}
    for k in (1, 5, 20):
        assert per_k[k] == pytest.approx(reference_knn(train, y_train, test, y_test, k, 0.07), abs=1e-9)


def test_knn_errors():
    with pytest.raises(SailError, match="larger than"):
        metrics.knn_classify(unit(5, 4, 0), [0] * 5, unit(2, 4, 1), [0, 0], k=6)


# ---------------------------------------------------------------------------------------------------
# linear probe


def separable(n, seed, d=10, classes=4):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=torch.Generator().manual_seed(99)) * 6
    return centres[y] + torch.randn(n, d, generator=g) + 5.0, y  # offset: standardisation matters


def test_linear_probe_separable_reaches_100_and_picks_from_grid():
    train_x, train_y = separable(200, 0)
    test_x, test_y = separable(80, 1)
    grid = (1e-4, 1e-2, 1.0)
    got = metrics.linear_probe(train_x, train_y, test_x, test_y, weight_decays=grid, epochs=100)
    assert got["top1"] == 100.0 and got["top5"] == 100.0
    assert got["best_weight_decay"] in grid
    curve = got["val_top1_by_weight_decay"]
    assert set(curve) == {"0.0001", "0.01", "1"}
    best = max(grid, key=lambda wd: (curve[f"{wd:g}"], wd))
    assert got["best_weight_decay"] == best and got["val_top1"] == curve[f"{best:g}"]
    again = metrics.linear_probe(train_x.numpy(), train_y.numpy(), test_x, test_y, weight_decays=grid, epochs=100)
    assert again == got  # deterministic with the seed


def test_linear_probe_prefers_strong_decay_on_noise_fit():
    # Few samples, many pure-noise features and one weakly informative one: weak decay overfits.
    g = torch.Generator().manual_seed(0)
    n, d = 80, 200
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g)
    x[:, 0] += 1.5 * (2 * y - 1)
    tx = torch.randn(400, d, generator=g)
    ty = torch.arange(400) % 2
    tx[:, 0] += 1.5 * (2 * ty - 1)
    got = metrics.linear_probe(x, y, tx, ty, val_fraction=0.5, weight_decays=(1e-6, 10.0), epochs=200)
    curve = got["val_top1_by_weight_decay"]
    assert curve["10"] > curve["1e-06"] and got["best_weight_decay"] == 10.0
    assert got["top1"] > 60  # chance is 50


def test_logistic_regression_is_a_stationary_point():
    x, y = separable(60, 3, d=5, classes=3)
    x = (x - x.mean(0)) / x.std(0)
    wd = 1e-2
    w, b = metrics.logistic_regression(x, y, 3, wd, epochs=300)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    # plain objective: mean over samples of -log softmax at the label, plus wd/2 * squared weights
    logits = x @ w + b
    nll = sum(torch.logsumexp(logits[i], 0) - logits[i, y[i]] for i in range(len(y))) / len(y)
    (nll + 0.5 * wd * (w ** 2).sum()).backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_linear_probe_too_few_samples():
    with pytest.raises(SailError, match="too few"):
        metrics.linear_probe(torch.randn(3, 4), [0, 1, 2], torch.randn(2, 4), [0, 1])


# ---------------------------------------------------------------------------------------------------
# mutual kNN alignment


def reference_mutual_knn(a, b, k):
    def neighbours(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        out = []
        for i in range(len(x)):
            sims = sorted(((float(x[i] @ x[j]), j) for j in range(len(x)) if j != i), reverse=True)
            out.append({j for _, j in sims[:k]})
        return out
    na, nb = neighbours(a), neighbours(b)
    return sum(len(p & q) / k for p, q in zip(na, nb)) / len(a)


def test_mutual_knn_matches_reference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6))
    b = np.concatenate([a[:, :3], rng.normal(size=(40, 5))], axis=1) * 3.0  # partly shared, other dim
    got = metrics.mutual_knn_alignment(a, b, k=5, chunk_size=7)
    assert got == pytest.approx(reference_mutual_knn(a, b, 5), abs=1e-12)
    assert 0.2 < got < 0.9


def test_mutual_knn_identical_and_independent():
    a = unit(300, 16, 0).float()
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    assert metrics.mutual_knn_alignment(a, a, k=10) == 1.0
    assert metrics.mutual_knn_alignment(a, 4.0 * a @ rotation, k=10) == pytest.approx(1.0, abs=0.01)
    independent = metrics.mutual_knn_alignment(a, unit(300, 32, 2), k=10)
    assert independent == pytest.approx(10 / 299, abs=0.012)
    with pytest.raises(SailError, match="rows"):
        metrics.mutual_knn_alignment(a, a[:10])


# ---------------------------------------------------------------------------------------------------
# segmentation


def reference_seg(pred, target, num_classes, ignore):
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    correct = total = 0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t == ignore:
            continue
        total += 1
        if p == t:
            tp[t] += 1
            correct += 1
        else:
            fp[p] += 1
            fn[t] += 1
    per_class = [100.0 * tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else None
                 for c in range(num_classes)]
    present = [v for v in per_class if v is not None]
    return {"mIoU": sum(present) / len(present), "pixel_accuracy": 100.0 * correct / total,
            "per_class_iou": per_class}


def test_segmentation_matches_reference_and_streams():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (3, 9, 11), generator=g)  # classes 0..3 in target
    pred = torch.where(torch.rand(3, 9, 11, generator=g) < 0.6, target, torch.randint(0, 6, (3, 9, 11), generator=g))
    target[:, :2] = 255  # ignored rows (pred there is whatever)
    pred[0, 0, 0] = 0
    num_classes = 7  # class 6 absent from both; 4, 5 appear only in pred
    want = reference_seg(pred, target, num_classes, 255)
    got = metrics.segmentation_miou(pred, target.numpy(), num_classes)
    assert got["per_class_iou"][6] is None and got["per_class_iou"][4] == 0.0
    assert got["mIoU"] == pytest.approx(want["mIoU"])
    assert got["pixel_accuracy"] == pytest.approx(want["pixel_accuracy"])
    assert got["per_class_iou"] == pytest.approx(want["per_class_iou"])
    cm = metrics.ConfusionMatrix(num_classes)
    for i in range(3):
        cm.update(pred[i], target[i])
    streamed = cm.compute()
    assert streamed["per_class_iou"] == got["per_class_iou"]
    assert (streamed["mIoU"], streamed["pixel_accuracy"]) == (got["mIoU"], got["pixel_accuracy"])


def test_segmentation_errors():
    cm = metrics.ConfusionMatrix(3)
    with pytest.raises(SailError, match="outside"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 3))
    with pytest.raises(SailError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(SailError, match="argmax"):
        cm.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    cm.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 255))
    with pytest.raises(SailError, match="no labelled pixels"):
        cm.compute()
