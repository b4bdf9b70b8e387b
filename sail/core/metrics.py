"""Evaluation metrics on embeddings: retrieval, zero-shot, Winoground, kNN, linear probe, mIoU.

Plain functions on torch tensors (numpy arrays are accepted too), used by `sail eval` and by anyone
with their own embeddings:

    from sail.core import metrics
    classes = metrics.class_embeddings(model.encode_text, ["cat", "dog"], ["a photo of a {}."])
    metrics.zeroshot(image_emb, classes, labels)            # {"top1": 87.5, "top5": 100.0, ...}
    metrics.retrieval(image_emb, text_emb, text_image)      # {"image_to_text_R@1": ..., ...}

Conventions
- Embeddings are assumed L2-normalised (cosine = dot product) unless a function says otherwise.
- Percentages are in percent (0-100), returned as plain Python floats in dicts.
- Ties are broken pessimistically: a wrong item whose score equals the best correct item's score ranks
  ahead of it. Degenerate embeddings (all equal) therefore score 0, not 100, and results do not depend
  on the order of the gallery.
- Scores are computed on the inputs' device, in float32 (float64 if given float64), in chunks of
  queries, so the full queries x gallery matrix never exists at once.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sail.core.errors import SailError


# ---------------------------------------------------------------------------------------------------
# input handling


def _tensor(x, name):
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise SailError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}") from e


def _embeddings(x, name, device=None):
    """A 2-D float tensor (float32, or float64 if given), finite, on `device` if given."""
    x = _tensor(x, name)
    if x.ndim != 2:
        raise SailError(f"{name} must be 2-D (n, dim), got shape {tuple(x.shape)}")
    if x.dtype != torch.float64:
        x = x.float()
    if device is not None:
        x = x.to(device)
    if not torch.isfinite(x).all():
        raise SailError(f"{name} contains NaN or inf values; check the encoder outputs")
    return x


def _labels(x, name, n, num_classes=None, device=None):
    """A 1-D int64 tensor of length n with values in [0, num_classes)."""
    x = _tensor(x, name)
    if x.ndim != 1 or x.shape[0] != n:
        raise SailError(f"{name} must be 1-D with {n} entries, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not torch.equal(x, x.round()):
        raise SailError(f"{name} must hold integer class/row indices")
    x = x.long()
    if device is not None:
        x = x.to(device)
    if n and x.min() < 0:
        raise SailError(f"{name} has negative entries; labels must be 0-based indices")
    if n and num_classes is not None and x.max() >= num_classes:
        raise SailError(f"{name} has value {int(x.max())} but there are only {num_classes} rows to point at")
    return x


def _same_dim(a, b, name_a, name_b):
    if a.shape[1] != b.shape[1]:
        raise SailError(f"{name_a} has dim {a.shape[1]} but {name_b} has dim {b.shape[1]}; "
                        "they must live in the same embedding space")


def _check_ks(ks):
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise SailError(f"ks must be positive integers, got {ks}")
    return ks


def _pct(hits):
    return 100.0 * hits.double().mean().item()


def _pessimistic_rank(scores, target):
    """Rank of the correct column per row, ties counted against it: (B, M), (B,) -> (B,) int64.

    rank = number of other columns scoring >= the correct one; a top-k hit is rank < k.
    """
    correct = scores.gather(1, target[:, None])  # (B, 1)
    return (scores >= correct).sum(1) - 1  # minus the correct column itself


# ---------------------------------------------------------------------------------------------------
# retrieval and zero-shot classification


def retrieval(image_emb, text_emb, text_image, ks=(1, 5, 10), chunk_size=4096):
    """Image<->text recall@k in percent, several captions per image (COCO / Flickr30k protocol).

    image_emb (N, D), text_emb (M, D); text_image[j] = row of caption j's image in image_emb.
    image->text is a hit at k if ANY of the image's captions is in its top k; text->image if the
    caption's image is in its top k. Ties are pessimistic: a wrong item scoring equal to the best
    correct one ranks ahead of it. Every image needs at least one caption.
    Returns {"image_to_text_R@1", "text_to_image_R@1", ...} for each k.
    """
    images = _embeddings(image_emb, "image_emb")
    texts = _embeddings(text_emb, "text_emb", device=images.device).to(images.dtype)
    _same_dim(images, texts, "image_emb", "text_emb")
    n_img, n_txt = images.shape[0], texts.shape[0]
    owner = _labels(text_image, "text_image", n_txt, num_classes=n_img, device=images.device)
    ks = _check_ks(ks)
    if n_img == 0:
        raise SailError("retrieval needs at least one image")
    n_caps = torch.bincount(owner, minlength=n_img)
    if (n_caps == 0).any():
        missing = torch.nonzero(n_caps == 0).flatten()[:5].tolist()
        raise SailError(f"{int((n_caps == 0).sum())} images have no caption (e.g. rows {missing}); "
                        "drop them or fix text_image")

    # text -> image: one correct image per caption.
    t2i = []
    for a in range(0, n_txt, chunk_size):
        scores = texts[a:a + chunk_size] @ images.T  # (B, D) @ (D, N) -> (B, N)
        t2i.append(_pessimistic_rank(scores, owner[a:a + chunk_size]))
    t2i = torch.cat(t2i)

    # image -> text: the image's best-scoring caption counts; other captions of the same image
    # are not competitors.
    i2t = []
    for a in range(0, n_img, chunk_size):
        rows = torch.arange(a, min(a + chunk_size, n_img), device=images.device)
        scores = images[rows] @ texts.T  # (B, D) @ (D, M) -> (B, M)
        mine = owner[None, :] == rows[:, None]  # (B, M) caption j belongs to image row
        best = scores.masked_fill(~mine, -math.inf).amax(1, keepdim=True)  # (B, 1)
        i2t.append(((scores >= best) & ~mine).sum(1))
    i2t = torch.cat(i2t)

    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = _pct(i2t < k)
        out[f"text_to_image_R@{k}"] = _pct(t2i < k)
    return out


def zeroshot(image_emb, class_emb, labels, ks=(1, 5), chunk_size=4096):
    """Zero-shot classification in percent: {"top1", "top5", "mean_per_class_recall"}.

    image_emb (N, D), class_emb (C, D) (e.g. from `class_embeddings`), labels (N,) in [0, C).
    Top-k uses the pessimistic tie rule; k larger than C counts as C (always a hit).
    mean_per_class_recall averages top-1 recall over the classes present in labels.
    """
    images = _embeddings(image_emb, "image_emb")
    classes = _embeddings(class_emb, "class_emb", device=images.device).to(images.dtype)
    _same_dim(images, classes, "image_emb", "class_emb")
    n, n_classes = images.shape[0], classes.shape[0]
    labels = _labels(labels, "labels", n, num_classes=n_classes, device=images.device)
    ks = _check_ks(ks)
    if n == 0:
        raise SailError("zeroshot needs at least one image")

    ranks = torch.cat([
        _pessimistic_rank(images[a:a + chunk_size] @ classes.T, labels[a:a + chunk_size])  # (B, C)
        for a in range(0, n, chunk_size)
    ])
    out = {f"top{k}": _pct(ranks < min(k, n_classes)) for k in ks}
    recalls = [(ranks[labels == c] == 0).double().mean() for c in torch.unique(labels)]
    out["mean_per_class_recall"] = 100.0 * torch.stack(recalls).mean().item()
    return out


def _fill_template(template, classname):
    if "{c}" not in template and "{}" not in template:
        raise SailError(f"template {template!r} has no '{{}}' or '{{c}}' placeholder for the class name; "
                        "add one, e.g. 'a photo of a {}.'")
    # str.replace rather than str.format: templates may contain other braces.
    return template.replace("{c}", classname).replace("{}", classname)


def class_embeddings(encode_text, classnames, templates, batch_size=4096):
    """Zero-shot classifier weights (C, D): per class, mean of its L2-normalised template embeddings.

    encode_text: callable list[str] -> (n, D) tensor or array. templates contain "{}" or "{c}"
    (e.g. "a photo of a {}."); each is formatted with each class name; the C * T prompts are encoded in
    a few calls of at most batch_size prompts. Each prompt embedding is L2-normalised, the T of a
    class averaged, and the mean re-normalised.
    """
    if isinstance(classnames, str) or isinstance(templates, str):
        raise SailError("classnames and templates must be lists of strings, not a single string")
    classnames, templates = list(classnames), list(templates)
    if not classnames or not templates:
        raise SailError("class_embeddings needs at least one class name and one template")
    prompts = [_fill_template(t, c) for c in classnames for t in templates]  # class-major, C * T

    chunks = []
    for a in range(0, len(prompts), batch_size):
        emb = _tensor(encode_text(prompts[a:a + batch_size]), "encode_text output")
        chunks.append(emb.detach().to(chunks[0].device if chunks else emb.device))
    emb = torch.cat(chunks)
    if emb.ndim != 2 or emb.shape[0] != len(prompts):
        raise SailError(f"encode_text returned shape {tuple(emb.shape)} for {len(prompts)} prompts; "
                        "it must return one row per prompt")
    if emb.dtype != torch.float64:
        emb = emb.float()
    emb = F.normalize(emb, dim=-1).view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(emb.mean(1), dim=-1)  # (C, D)


def winoground(scores):
    """Winoground text / image / group scores in percent (Thrush et al. 2022).

    scores (N, 2, 2) with scores[n, i, j] = sim(image_i, caption_j). Per sample, text is correct when
    s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1); image when s(c0,i0) > s(c0,i1) and
    s(c1,i1) > s(c1,i0); group when both. Strict inequalities: ties count as wrong.
    """
    s = _tensor(scores, "scores")
    if s.ndim != 3 or tuple(s.shape[1:]) != (2, 2) or s.shape[0] == 0:
        raise SailError(f"winoground scores must have shape (N, 2, 2), got {tuple(s.shape)}")
    s = s.double()
    i0c0, i0c1, i1c0, i1c1 = s[:, 0, 0], s[:, 0, 1], s[:, 1, 0], s[:, 1, 1]
    text = (i0c0 > i0c1) & (i1c1 > i1c0)  # each image prefers its own caption
    image = (i0c0 > i1c0) & (i1c1 > i0c1)  # each caption prefers its own image
    return {"text": _pct(text), "image": _pct(image), "group": _pct(text & image)}


# ---------------------------------------------------------------------------------------------------
# classification on frozen features: kNN and linear probe


def knn_classify(train_emb, train_labels, test_emb, test_labels, k=20, temperature=0.07, chunk_size=4096,
                 progress=False):
    """Weighted kNN classification in percent (DINO protocol): {"top1", "top5"}.

    Each test row's k most cosine-similar train rows (exact search, in chunks of test rows, on the
    inputs' device: pass CUDA tensors to run on a GPU) vote for their labels with weight
    exp(sim / temperature); classes are ranked by total vote (pessimistic ties; a class with no votes
    ties at 0). Embeddings are assumed L2-normalised. For several k from one search, see `knn_sweep`.
    """
    return knn_sweep(train_emb, train_labels, test_emb, test_labels, [int(k)], temperature, chunk_size, progress)[int(k)]


def knn_sweep(train_emb, train_labels, test_emb, test_labels, ks=(10, 20, 100, 200), temperature=0.07,
              chunk_size=4096, progress=False):
    """`knn_classify` for several k from one neighbour search: {k: {"top1", "top5"}}."""
    train = _embeddings(train_emb, "train_emb")
    test = _embeddings(test_emb, "test_emb", device=train.device).to(train.dtype)
    _same_dim(train, test, "train_emb", "test_emb")
    y_train = _labels(train_labels, "train_labels", train.shape[0], device=train.device)
    y_test = _labels(test_labels, "test_labels", test.shape[0], device=train.device)
    ks = _check_ks(ks)
    if max(ks) > train.shape[0]:
        raise SailError(f"k={max(ks)} is larger than the {train.shape[0]} training samples")
    if test.shape[0] == 0:
        raise SailError("knn_classify needs at least one test sample")
    if temperature <= 0:
        raise SailError(f"temperature must be > 0, got {temperature}")
    n_classes = int(max(y_train.max(), y_test.max())) + 1

    ranks = {kk: [] for kk in ks}
    for a in tqdm(range(0, test.shape[0], chunk_size), desc="knn", unit="chunk", disable=not progress, dynamic_ncols=True):
        sims, idx = (test[a:a + chunk_size] @ train.T).topk(max(ks), dim=1)  # (B, N) -> (B, kmax), best first
        weights, nb, y = (sims.double() / temperature).exp(), y_train[idx], y_test[a:a + chunk_size]
        for kk in ks:
            votes = torch.zeros(sims.shape[0], n_classes, dtype=torch.float64, device=train.device)
            votes.scatter_add_(1, nb[:, :kk], weights[:, :kk])  # (B, C) vote totals
            ranks[kk].append(_pessimistic_rank(votes, y))
    out = {}
    for kk in ks:
        r = torch.cat(ranks[kk])
        out[kk] = {"top1": _pct(r < 1), "top5": _pct(r < min(5, n_classes))}
    return out


def logistic_regression(x, y, num_classes, weight_decay, epochs=200):
    """Fit multinomial logistic regression with full-batch L-BFGS; returns weight (D, C), bias (C,).

    Minimises mean cross-entropy(x @ W + b, y) + weight_decay / 2 * ||W||^2 (bias not decayed),
    starting from zero, for at most `epochs` L-BFGS iterations. Deterministic for a given input.
    """
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=epochs, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def _standardised(fit_x, *others):
    # Statistics from the fitting set only; constant features stay 0 instead of dividing by zero.
    mean, std = fit_x.mean(0), fit_x.std(0, unbiased=False).clamp_min(1e-8)
    return [(t - mean) / std for t in (fit_x, *others)]


def _stratified_split(y, val_fraction, seed):
    """Per class, a seeded random val_fraction of its samples goes to validation."""
    gen = torch.Generator().manual_seed(seed)
    val = []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        val.append(members[:int(len(members) * val_fraction)])
    is_val = torch.zeros(len(y), dtype=torch.bool)
    is_val[torch.cat(val)] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def linear_probe(train_x, train_y, test_x, test_y, val_fraction=0.2,
                 weight_decays=(1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), epochs=200, seed=0, progress=False):
    """Linear probe on frozen features, in percent: logistic regression with a tuned weight decay.

    Features need not be normalised: they are standardised with statistics of the fitting set.
    Each weight decay is fitted on a stratified, seeded (1 - val_fraction) part of the train set and
    scored on the rest; the best one (ties go to the stronger decay) is refitted on all of train and
    scored on test. See `logistic_regression` for the objective. Runs on the inputs' device.
    Returns {"top1", "top5", "best_weight_decay", "val_top1", "val_top1_by_weight_decay"}.
    """
    train_x = _embeddings(train_x, "train_x")
    test_x = _embeddings(test_x, "test_x", device=train_x.device).to(train_x.dtype)
    _same_dim(train_x, test_x, "train_x", "test_x")
    train_y = _labels(train_y, "train_y", train_x.shape[0])
    test_y = _labels(test_y, "test_y", test_x.shape[0])
    if not 0 < val_fraction < 1:
        raise SailError(f"val_fraction must be in (0, 1), got {val_fraction}")
    weight_decays = [float(wd) for wd in weight_decays]
    if not weight_decays or min(weight_decays) < 0:
        raise SailError(f"weight_decays must be a non-empty list of values >= 0, got {weight_decays}")
    if test_x.shape[0] == 0:
        raise SailError("linear_probe needs at least one test sample")
    n_classes = int(max(train_y.max(), test_y.max())) + 1

    fit_idx, val_idx = _stratified_split(train_y, val_fraction, seed)
    if len(val_idx) == 0 or len(fit_idx) == 0:
        raise SailError(f"{train_x.shape[0]} training samples are too few for a validation split of "
                        f"{val_fraction}; give more samples or a larger val_fraction")

    def accuracy(x, y, w, b, k=1):
        return _pct(_pessimistic_rank(x @ w + b, y.to(x.device)) < min(k, n_classes))

    train_y_dev = train_y.to(train_x.device)
    x_fit, x_val = _standardised(train_x[fit_idx.to(train_x.device)], train_x[val_idx.to(train_x.device)])
    val_acc = {}
    for wd in tqdm(weight_decays, desc="linear probe (weight decays)", disable=not progress, dynamic_ncols=True):
        w, b = logistic_regression(x_fit, train_y_dev[fit_idx.to(train_x.device)], n_classes, wd, epochs)
        val_acc[wd] = accuracy(x_val, train_y[val_idx], w, b)
    best = max(weight_decays, key=lambda wd: (val_acc[wd], wd))

    x_all, x_test = _standardised(train_x, test_x)
    w, b = logistic_regression(x_all, train_y_dev, n_classes, best, epochs)
    return {
        "top1": accuracy(x_test, test_y, w, b, 1),
        "top5": accuracy(x_test, test_y, w, b, 5),
        "best_weight_decay": best,
        "val_top1": val_acc[best],
        "val_top1_by_weight_decay": {f"{wd:g}": acc for wd, acc in val_acc.items()},
    }


# ---------------------------------------------------------------------------------------------------
# representation alignment


def _knn_indices(x, k, chunk_size):
    """Indices of each row's k most cosine-similar other rows: (N, D) -> (N, k)."""
    x = F.normalize(x, dim=-1)
    out = []
    for a in range(0, x.shape[0], chunk_size):
        rows = torch.arange(a, min(a + chunk_size, x.shape[0]), device=x.device)
        sims = x[rows] @ x.T  # (B, D) @ (D, N) -> (B, N)
        sims[torch.arange(len(rows), device=x.device), rows] = -math.inf  # a sample is not its own neighbour
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


def mutual_knn_alignment(feats_a, feats_b, k=10, chunk_size=4096):
    """Mutual k-nearest-neighbour alignment of two feature spaces (Huh et al. 2024), in [0, 1].

    feats_a (N, Da) and feats_b (N, Db) describe the same N samples (row i = sample i). Each space is
    L2-normalised here; for every sample the k cosine nearest neighbours (excluding itself) are found
    in each space and the overlap |N_A & N_B| / k is averaged over samples. Identical spaces give 1;
    independent spaces about k / (N - 1). Neighbours tied at the k-th place are chosen arbitrarily.
    """
    a = _embeddings(feats_a, "feats_a")
    b = _embeddings(feats_b, "feats_b", device=a.device)
    if a.shape[0] != b.shape[0]:
        raise SailError(f"feats_a has {a.shape[0]} rows but feats_b has {b.shape[0]}; "
                        "row i of both must be the same sample")
    if not 1 <= k < a.shape[0]:
        raise SailError(f"k must be in [1, {a.shape[0] - 1}] for {a.shape[0]} samples, got {k}")
    na, nb = _knn_indices(a, k, chunk_size), _knn_indices(b, k, chunk_size)
    # (N, k, 1) == (N, 1, k): neighbour indices within a row are distinct, so the sum counts |N_A & N_B|.
    overlap = (na[:, :, None] == nb[:, None, :]).sum((1, 2))
    return (overlap.double() / k).mean().item()


# ---------------------------------------------------------------------------------------------------
# segmentation


class ConfusionMatrix:
    """Streaming confusion matrix for semantic segmentation; rows = target class, columns = prediction.

        cm = ConfusionMatrix(num_classes=21)
        for pred, target in batches:        # integer label maps of equal shape, e.g. (B, H, W)
            cm.update(pred, target)
        cm.compute()                        # {"mIoU", "pixel_accuracy", "per_class_iou"}

    Pixels whose target is ignore_index are skipped (whatever was predicted there).
    """

    def __init__(self, num_classes, ignore_index=255):
        if num_classes < 1:
            raise SailError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self):
        self.matrix.zero_()

    def update(self, pred, target):
        pred, target = _tensor(pred, "pred"), _tensor(target, "target")
        if pred.shape != target.shape:
            raise SailError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}; "
                            "pass class indices (argmax over logits), upsampled to the target size")
        if pred.is_floating_point():
            raise SailError("pred must hold integer class indices; take argmax over the class logits first")
        target = target.long().flatten()
        keep = target != self.ignore_index
        t, p = target[keep], pred.long().flatten().to(target.device)[keep]
        c = self.num_classes
        if t.numel() and (t.min() < 0 or t.max() >= c):
            raise SailError(f"target has class {int(t.max() if t.max() >= c else t.min())} outside [0, {c}) "
                            f"and not ignore_index={self.ignore_index}")
        if p.numel() and (p.min() < 0 or p.max() >= c):
            raise SailError(f"pred has class {int(p.max() if p.max() >= c else p.min())} outside [0, {c})")
        self.matrix += torch.bincount(t * c + p, minlength=c * c).view(c, c).cpu()  # (target, pred) counts

    def compute(self):
        """mIoU and pixel accuracy in percent; classes absent from both pred and target are excluded
        from the mean and reported as None in per_class_iou."""
        m = self.matrix.double()
        total = m.sum()
        if total == 0:
            raise SailError("no labelled pixels were seen; "
                            "call update() with targets that are not all ignore_index")
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp  # predicted + actual - both
        present = union > 0
        iou = 100.0 * tp / union.clamp_min(1)
        return {
            "mIoU": iou[present].mean().item(),
            "pixel_accuracy": (100.0 * tp.sum() / total).item(),
            "per_class_iou": [v if ok else None for v, ok in zip(iou.tolist(), present.tolist())],
        }


def segmentation_miou(pred, target, num_classes, ignore_index=255):
    """One-shot mIoU over integer label maps: {"mIoU", "pixel_accuracy", "per_class_iou"} in percent."""
    cm = ConfusionMatrix(num_classes, ignore_index)
    cm.update(pred, target)
    return cm.compute()
