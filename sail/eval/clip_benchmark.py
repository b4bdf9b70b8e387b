"""Run CLIP_benchmark (LAION-AI/CLIP_benchmark) on a sail run: model type `sail`.

CLIP_benchmark has no plugin mechanism: this launcher registers a loader under model type "sail" in
`clip_benchmark.models.TYPE2FUNC` and then hands over to its own command line, so every dataset,
task and option of CLIP_benchmark works unchanged. `--model` is the run directory.

    pip install "sail[clip-benchmark]"        # clip_benchmark pulls open_clip_torch and torchvision
    python -m sail.eval.clip_benchmark eval --model runs/cc3m --dataset wds/imagenet1k \
        --dataset_root "https://huggingface.co/datasets/clip-benchmark/wds_{dataset_cleaned}/tree/main" \
        --task zeroshot_classification --output result.json

`--pretrained` defaults to `run` (the encoders named in the run's config.json); give
`vision=DIR,text=DIR` (either part optional) to point at local copies of the encoders instead.
"""

from __future__ import annotations

import sys

from sail.core.errors import SailError

MODEL_TYPE = "sail"


def parse_pretrained(pretrained: str | None) -> dict:
    """ "run" / "" -> {}; "vision=DIR,text=DIR" -> {"vision_model": DIR, "text_model": DIR}."""
    overrides = {}
    for part in (pretrained or "").split(","):
        part = part.strip()
        if not part or part == "run":
            continue
        key, sep, value = part.partition("=")
        if not sep or key not in ("vision", "text") or not value:
            raise SailError(f"--pretrained {pretrained!r}: give 'run' or 'vision=DIR,text=DIR' (local encoder copies)")
        overrides[f"{key}_model"] = value
    return overrides


def load_sail(model_name: str, pretrained: str | None = None, cache_dir: str | None = None, device="cpu"):
    """CLIP_benchmark's loader contract: (model, transform, tokenizer) for the run in `model_name`."""
    from sail.train.model import OpenCLIPAdapter, SAILModel

    model = SAILModel.from_pretrained(model_name, device=str(device), **parse_pretrained(pretrained))
    if not isinstance(model, SAILModel):
        raise SailError(f"{model_name} is a full-model recipe run; this launcher takes `sail align` runs")
    return OpenCLIPAdapter.create(model)


def _topk_accuracy(output, target, topk=(1,)):
    """clip_benchmark's `accuracy` (fraction of rows whose target is in the top k), numpy-2 safe."""
    pred = output.topk(max(topk), 1, True, True)[1].t()  # (kmax, N)
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def patch_metrics() -> None:
    """clip_benchmark 1.6.2 calls float() on a 1-element array, an error under numpy 2: swap in the same
    formula written with .item(). Nothing else of its metric code is touched."""
    from clip_benchmark.metrics import zeroshot_classification

    zeroshot_classification.accuracy = _topk_accuracy


def register() -> None:
    """Make `--model_type sail` known to an imported clip_benchmark (idempotent)."""
    try:
        import clip_benchmark.models as cb_models
    except ImportError as e:
        raise SailError(f"clip_benchmark cannot be imported ({e}); install it with: pip install 'sail[clip-benchmark]'") from None
    cb_models.TYPE2FUNC[MODEL_TYPE] = load_sail
    if MODEL_TYPE not in cb_models.MODEL_TYPES:
        cb_models.MODEL_TYPES.append(MODEL_TYPE)  # the same list object its CLI offers as --model_type choices
    patch_metrics()


def clip_benchmark_argv(argv: list[str]) -> list[str]:
    """Our defaults for `eval`: model type sail, pretrained "run"; everything else passes through."""
    argv = list(argv)
    if argv[:1] == ["eval"]:
        if "--model_type" not in argv:
            argv += ["--model_type", MODEL_TYPE]
        if "--pretrained" not in argv and "--pretrained_model" not in argv:
            argv += ["--pretrained", "run"]
    return argv


def main(argv: list[str] | None = None) -> int:
    register()
    try:
        from clip_benchmark import cli
    except ImportError as e:
        raise SailError(f"clip_benchmark's CLI cannot be imported ({e}); install it with: pip install 'sail[clip-benchmark]'") from None
    sys.argv = ["clip_benchmark", *clip_benchmark_argv(sys.argv[1:] if argv is None else argv)]
    cli.main()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SailError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
