"""sail.train.step.contrastive_backward (GradCache with trainable towers): a step in micro-batches equals the one big step (float64, tiny towers), replays the same
dropout masks, and updates BatchNorm running statistics once per micro-batch."""

import pytest
import torch
from torch import nn

from sail.core.errors import SailError
from sail.train.losses import info_nce_loss
from sail.train.step import contrastive_backward
from sail.train.towers import build_towers

CLIP_VISION = {"type": "clip", "config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "image_size": 16, "patch_size": 8}}
CLIP_TEXT = {"type": "clip", "tokenizer": "char", "max_length": 24,
             "config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "max_position_embeddings": 24}}
WORDS = ["red", "green", "blue", "circle", "square", "cross", "left", "right", "top", "small", "large"]


def _batch(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64)
    pick = lambda: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (3,), generator=g).tolist())  # noqa: E731
    return pixels, [pick() for _ in range(b)], [pick() + " " + pick() for _ in range(b)]


def _gated_loss(x, y, t):
    """A loss over two text columns with per-sample weights that depend on the whole batch (like ALIP's gates)."""
    raw, cap = y.chunk(2)
    w = torch.softmax((x * raw).sum(1).detach() * 3, 0) * len(x)  # weights from every sample, no gradient
    loss = info_nce_loss(x, raw, t, weights=w) + info_nce_loss(x, cap, t, label_smoothing=0.1)
    return loss, {"w": w}


def _grads(towers, pixels, raw, cap, accum_steps):
    towers.zero_grad(set_to_none=True)
    tokens = towers.tokenize(raw + cap)
    loss, logs = contrastive_backward(towers, pixels, tokens["input_ids"], tokens["attention_mask"], _gated_loss,
                                      accum_steps)
    return loss, logs, {n: p.grad.clone() for n, p in towers.named_parameters()}


@pytest.mark.parametrize("b,k", [(10, 3), (8, 2), (7, 7)])
def test_micro_batches_give_the_big_steps_loss_and_gradients(b, k):
    torch.manual_seed(0)
    towers = build_towers("alip", CLIP_VISION, CLIP_TEXT, embed_dim=8, projection={"image": "clip", "text": "clip"})
    towers.double().train()
    pixels, raw, cap = _batch(b)
    loss1, logs1, g1 = _grads(towers, pixels, raw, cap, 1)
    loss_k, logs_k, g_k = _grads(towers, pixels, raw, cap, k)
    torch.testing.assert_close(loss_k, loss1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logs_k["w"], logs1["w"], rtol=1e-12, atol=1e-12)  # the loss saw the whole batch
    assert g1.keys() == g_k.keys() and "log_scale" in g1
    for name in g1:
        torch.testing.assert_close(g_k[name], g1[name], rtol=1e-9, atol=1e-12, msg=name)


class _Tower(nn.Module):
    """Dropout and BatchNorm in both towers: what the replay must get right."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 4))
        self.text = nn.Sequential(nn.Embedding(50, 6), nn.Dropout(0.3), nn.Flatten(), nn.Linear(18, 4))
        self.log_scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, pixels, input_ids, attention_mask):
        x = nn.functional.normalize(self.image(pixels), dim=-1)
        y = nn.functional.normalize(self.text(input_ids * attention_mask), dim=-1)
        return x, y, self.log_scale.exp()


def test_replay_uses_the_same_dropout_masks_and_updates_batchnorm_once():
    b, k = 9, 3
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(b, 3, 2, 2, generator=g)
    ids = torch.randint(50, (2 * b, 3), generator=g)
    mask = torch.ones_like(ids)
    loss_fn = lambda x, y, t: (info_nce_loss(x, y[:b], t) + info_nce_loss(x, y[b:], t), {})  # noqa: E731

    torch.manual_seed(0)
    model = _Tower().train()
    reference = _Tower().train()
    reference.load_state_dict(model.state_dict())

    torch.manual_seed(7)
    loss, _ = contrastive_backward(model, pixels, ids, mask, loss_fn, accum_steps=k)
    after = torch.get_rng_state()

    # reference: micro-batch forwards WITH graph in the same order from the same RNG state, one backward
    torch.manual_seed(7)
    chunks = torch.arange(b).tensor_split(k)
    xs, ys = [], [None] * (2 * b)
    for c in chunks:
        rows = torch.cat([c, c + b])
        x, y, t = reference(pixels[c], ids[rows], mask[rows])
        xs.append(x)
        for r, row in zip(rows.tolist(), y):
            ys[r] = row
    ref_loss = loss_fn(torch.cat(xs), torch.stack(ys), t)[0]
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss.detach())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    bn, ref_bn = model.image[2], reference.image[2]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)  # one update per micro-batch, not two
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == k
    assert torch.equal(after, torch.get_rng_state())  # the RNG ends where the reference's does


def test_bad_accum_steps():
    model = _Tower()
    with pytest.raises(SailError, match="accum_steps must be a positive integer"):
        contrastive_backward(model, torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, dtype=torch.long),
                             torch.ones(2, 3, dtype=torch.long), lambda x, y, t: (x.sum(), {}), accum_steps=0)
