"""Benchmark: one Lion / LAMB step over a tower-sized list of tensors, foreach (sail.train.optim) vs the per-tensor
Python loop of sail 0.1 (tests/test_optim.py keeps it as the reference).

    python benchmarks/optim_step.py                  # the tensors of CLIP ViT-B/32 + its text tower (~150M params)
    python benchmarks/optim_step.py --quick          # a ViT-Ti-sized list (~6M params)

The parameter list copies the shapes of a CLIP model built from its config (random init, no download).
Each optimizer gets 2 warm-up steps, then --steps timed steps; prints a table and one JSON line with the
seconds per step and the speed-up. On CPU the gain is the launch overhead saved; on a GPU (a few hundred
tensors, microsecond kernels) it is larger.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_optim import LAMBPerTensor, LionPerTensor  # noqa: E402

from sail.train.optim import LAMB, Lion  # noqa: E402


def tensors(quick: bool) -> list[torch.Tensor]:
    from transformers import CLIPConfig, CLIPModel

    if quick:
        cfg = CLIPConfig(text_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                                          num_attention_heads=3),
                         vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6,
                                            num_attention_heads=3, patch_size=32))
    else:
        cfg = CLIPConfig(vision_config=dict(patch_size=32))
    with torch.device("meta"):
        shapes = [p.shape for p in CLIPModel(cfg).parameters()]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g) for s in shapes]


def time_steps(cls, init, grads, steps, **kw) -> float:
    params = [torch.nn.Parameter(p.clone()) for p in init]
    for p, gr in zip(params, grads):
        p.grad = gr
    opt = cls([{"params": params, "weight_decay": 0.1}], **kw)
    for _ in range(2):
        opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    init = tensors(args.quick)
    grads = [torch.randn_like(p) for p in init]
    n = sum(p.numel() for p in init)
    result = {"tensors": len(init), "params": n, "threads": torch.get_num_threads()}
    print(f"{len(init)} tensors, {n / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    print(f"{'optimizer':10s} {'per-tensor s':>13s} {'foreach s':>10s} {'speed-up':>9s}")
    for name, fast, slow, kw in (("lion", Lion, LionPerTensor, dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)),
                                 ("lamb", LAMB, LAMBPerTensor, dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1))):
        t_slow = time_steps(slow, init, grads, args.steps, **kw)
        t_fast = time_steps(fast, init, grads, args.steps, **kw)
        print(f"{name:10s} {t_slow:13.4f} {t_fast:10.4f} {t_slow / t_fast:8.2f}x")
        result[name] = {"per_tensor_s": round(t_slow, 5), "foreach_s": round(t_fast, 5),
                        "speedup": round(t_slow / t_fast, 3)}
    print(json.dumps({"benchmark": "optim_step", **result}))


if __name__ == "__main__":
    main()
