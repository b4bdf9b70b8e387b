"""The `sail` command line: a thin layer over library functions a Python user can call directly.

    sail models                      list the encoder aliases
    sail extract --model M --data D  cache embeddings in a feature store
    sail info STORE                  print everything a store says about itself
    sail convert SRC --out DST       official SAIL checkpoints <-> sail runs
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

import typer

from sail.core.errors import SailError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sail: vision-language alignment tuning on frozen unimodal encoders.\n\n"
                       "Example: sail demo (then: sail COMMAND --help)")


_ARGV: list[str] = []  # the arguments of this invocation, for the resume command printed after Ctrl-C

_OVERWRITE = typer.Option(False, "--overwrite", help="replace an existing output")


def _check_out(out: Optional[str], overwrite: bool) -> None:
    """An output file the user named: never a folder, and an existing one is replaced only with --overwrite."""
    from pathlib import Path

    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise SailError(f"--out {out} is a directory; give a file path such as {path / 'results.json'}")
    if path.exists() and not overwrite:
        raise SailError(f"--out {out} already exists; pass --overwrite to replace it, or choose another path")


def _split(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def models():
    """List the encoder aliases with modality and feature dimension.

    Example: sail models
    """
    from sail.encoders import models_table

    typer.echo(models_table())
    from sail.encoders.zoo import zoo_table

    for name, modality, _, source, note in zoo_table():
        typer.echo(f"{name}  {modality}  {source}  {note}  [entry point sail.encoders]")
    typer.echo("\nAny Hugging Face id, local model directory or package.module:function works too; modality is "
               "inferred (force with --modality).")


@app.command()
def extract(
    model: str = typer.Option(..., help="alias (see `sail models`), Hugging Face id, or local model directory"),
    data: str = typer.Option(..., help="manifest (csv/tsv/jsonl/parquet), .tar shard(s) folder, image folder, or 'sample'"),
    columns: Optional[str] = typer.Option(None, help="caption columns for text models, comma-separated (default: caption[,long_caption])"),
    out: Optional[str] = typer.Option(None, help="store path (default FEATURES_ROOT/<dataset>/<model>.h5)"),
    features_root: str = typer.Option("features", help="root folder of feature stores (used when --out is not given)"),
    pooling: str = typer.Option("concat", help="image pooling: concat ([CLS; mean patch]), cls, mean"),
    patch_tokens: bool = typer.Option(False, "--patch-tokens", help="also store patch tokens (for segmentation)"),
    max_length: Optional[int] = typer.Option(None, help="text token limit (default: the model's maximum)"),
    modality: Optional[str] = typer.Option(None, help="force image or text"),
    batch_size: Optional[int] = typer.Option(None, help="items per forward pass (default: from the model's size; 32 on CPU)"),
    chunk_size: int = typer.Option(2048, help="rows per crash-safe part file"),
    workers: Optional[int] = typer.Option(None, help="image decoding workers (default: this process's cores - 1)"),
    precision: str = typer.Option("auto", help="weights dtype: auto (bf16 on Ampere+ GPUs, fp32 on CPU), fp32, bf16, fp16"),
    preprocess: str = typer.Option("fast", help="fast (PIL + torch, matches the processor) or hf (the model's own processor)"),
    decode: str = typer.Option("auto", help="JPEG decoding: cpu (workers), gpu (nvImageCodec, pip install 'sail\\[gpu-decode]') "
                               "or auto (gpu on CUDA where it works; says once when not)"),
    dist_timeout: float = typer.Option(720.0, help="minutes a torchrun rank may wait for the others"),
    overwrite: bool = _OVERWRITE,
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    id_column: str = typer.Option("id", help="manifest id column"),
    image_column: str = typer.Option("image", help="manifest image-path column (relative to the manifest)"),
    split: str = typer.Option("test", help="split of a CLIP_benchmark webdataset folder"),
    allow_truncated: bool = typer.Option(False, "--allow-truncated",
                                         help="keep the complete samples of truncated shards (recorded as skipped)"),
    max_pixels: int = typer.Option(100_000_000, help="skip larger images as 'too large' (0: no limit)"),
    encoding: str = typer.Option("utf-8", help="text encoding of a CSV/TSV/JSONL manifest (e.g. latin-1, utf-16)"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code/--no-trust-remote-code",
                                                     help="allow model code from the hub (default: per alias)"),
):
    """Run a frozen encoder once over a dataset and store its embeddings (resumable, crash-safe).

    Example: sail extract --model dinov2-l --data cc3m/shards/
    """
    from sail.encoders.extract import ExtractConfig, ExtractInterrupted, extract as run

    try:
        result = run(ExtractConfig(model=model, data=data, columns=_split(columns), out=out, features_root=features_root, pooling=pooling,
                                   patch_tokens=patch_tokens, max_length=max_length, modality=modality,
                                   batch_size=batch_size, chunk_size=chunk_size, workers=workers, device=device,
                                   id_column=id_column, image_column=image_column, split=split,
                                   allow_truncated=allow_truncated, max_pixels=max_pixels, encoding=encoding,
                                   trust_remote_code=trust_remote_code,
                                   precision=precision, preprocess=preprocess, decode=decode, dist_timeout=dist_timeout,
                                   overwrite=overwrite))
    except ExtractInterrupted as e:  # caught here: typer turns a KeyboardInterrupt into a silent exit 130
        _extract_interrupted(e)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(result.summary())


def _extract_interrupted(e) -> None:
    """Ctrl-C in `sail extract`: what is kept and the exact command that finishes the store."""
    import shlex

    if int(os.environ.get("RANK", "0")) == 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"torchrun --nproc_per_node {world} -m sail.cli" if world > 1 else "sail"
        typer.echo(f"interrupted; {e.kept} of {e.total} chunks of {e.out} are written and kept. Resume with:\n"
                   f"  {prefix} {shlex.join(_ARGV)}", err=True)
    raise typer.Exit(130)


# ~65 lines: one typer option per AlignConfig field, then one call.
@app.command()
def align(
    image: str = typer.Option(..., help="image feature store (.h5)"),
    text: str = typer.Option(..., help="text feature store (.h5) over the same ids"),
    out: str = typer.Option(..., help="run directory"),
    captions: Optional[str] = typer.Option(None, help="caption fields, comma-separated (default: first field; all for multi-positive)"),
    loss: str = typer.Option("sigmoid", help="sigmoid | multi-positive | info-nce"),
    average: str = typer.Option("pairs", help="what the sigmoid losses divide their sum over pairs by: pairs = the "
                                "number of pairs, B^2 (K*B^2 with K caption sets; SAIL's code); rows = B (SigLIP, SAIL "
                                "paper eq. 2), so the loss and every gradient are B (K*B) times larger. Lion, AdamW and "
                                "LAMB steps do not depend on the gradient's scale (up to eps): --lr carries over; the "
                                "logged loss does not. info-nce ignores it"),
    head: str = typer.Option("glu", help="linear | mlp | glu"),
    width: int = typer.Option(4, "--width-factor", "--width", help="mlp/glu heads: hidden width = FACTOR x input "
                              "dim (4 x 2048 = 8192 units for DINOv2-L features; paper 4, official scripts 8); "
                              "linear heads ignore it. --width is the same flag"),
    out_dim: int = typer.Option(1024, help="shared embedding dimension"),
    activation: str = typer.Option("relu6", help="GLU gate activation: relu6 | silu | gelu"),
    batch: int = typer.Option(36864, help="global batch size (pairs)"),
    epochs: int = typer.Option(10, help="passes over the training pairs"),
    steps: Optional[int] = typer.Option(None, help="total optimizer steps (overrides --epochs)"),
    optimizer: str = typer.Option("lion", help="lion | adamw | lamb"),
    lr: float = typer.Option(1e-5, help="peak learning rate"),
    weight_decay: float = typer.Option(1e-7, help="decoupled weight decay"),
    beta1: float = typer.Option(0.9), beta2: float = typer.Option(0.99),
    warmup: float = typer.Option(0.1, help="warmup: fraction of steps, or a step count if >= 1"),
    init_scale: float = typer.Option(20.0, help="initial temperature t"),
    init_bias: float = typer.Option(-10.0, help="initial bias b"),
    val_fraction: float = typer.Option(0.02, help="held-out fraction for validation R@1"),
    val_image: Optional[str] = typer.Option(None, help="separate validation image store"),
    val_text: Optional[str] = typer.Option(None, help="separate validation text store"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    precision: str = typer.Option("auto", help="auto | fp32 | bf16 | fp16 (auto: bf16 on Ampere+ GPUs, fp32 on CPU)"),
    in_memory: str = typer.Option("auto", help="auto | yes | no (stream from the stores); a resumed run keeps its own"),
    stream_block_rows: int = typer.Option(65536, help="streaming: rows per contiguous read"),
    stream_buffer_blocks: int = typer.Option(4, help="streaming: blocks shuffled together"),
    checkpoint_every: int = typer.Option(500, help="steps between checkpoints"),
    eval_every: int = typer.Option(500, help="steps between validation R@1"),
    block_size: Optional[int] = typer.Option(None, help="loss block rows (default: automatic)"),
    loss_impl: str = typer.Option("auto", help="sigmoid losses: auto (triton on CUDA if installed) | torch | triton"),
    chunk_size: Optional[int] = typer.Option(None, help="rows per head chunk (default: automatic from free memory)"),
    log_every: int = typer.Option(50, help="steps between reads of the loss/t/b statistics (and NaN checks)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    subset: Optional[str] = typer.Option(None, help="train only on the pairs whose ids this file lists (`sail curate`)"),
):
    """Train alignment heads on cached features; writes config.json + model.safetensors.

    Example: sail align --image features/cc3m/dinov2-l.h5 --text features/cc3m/gte-l.h5 --out runs/cc3m
    """
    from sail.core.artifacts import Lock
    from sail.train.align_heads import AlignConfig, AlignInterrupted, align as run

    try:
        with Lock(out, what="align run"):  # a second `sail align` on this --out stops here, naming this one's pid
            result = run(AlignConfig(image=image, text=text, out=out, captions=_split(captions), loss=loss, average=average,
                                     head=head, width=width, out_dim=out_dim, activation=activation, batch=batch, epochs=epochs,
                                     steps=steps, optimizer=optimizer, lr=lr, weight_decay=weight_decay, betas=(beta1, beta2),
                                     warmup=warmup, init_scale=init_scale, init_bias=init_bias, val_fraction=val_fraction,
                                     val_image=val_image, val_text=val_text, seed=seed, device=device, precision=precision,
                                     in_memory=in_memory, checkpoint_every=checkpoint_every, eval_every=eval_every,
                                     block_size=block_size, loss_impl=loss_impl, chunk_size=chunk_size, log_every=log_every,
                                     stream_block_rows=stream_block_rows, stream_buffer_blocks=stream_buffer_blocks,
                                     subset=subset),
                         resume=resume)
    except AlignInterrupted as e:
        _interrupted(e)
    if result.metrics:
        typer.echo(result.summary())


def _interrupted(e) -> None:
    """Ctrl-C in `sail align`: say where the run stands and print the exact command that continues it."""
    import os
    import shlex

    if int(os.environ.get("RANK", "0")) != 0:
        raise typer.Exit(130)
    args = list(_ARGV)
    if "--resume" not in args:
        args.append("--resume")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prefix = f"torchrun --nproc_per_node {world} -m sail.cli" if world > 1 else "sail"
    where = (f"the last checkpoint is step {e.checkpoint_step}" if e.checkpoint_step is not None
             else "no checkpoint was written yet, so it restarts from step 0")
    typer.echo(f"interrupted at step {e.step} of {e.run_dir}; {where}. Resume with:\n  {prefix} {shlex.join(args)}",
               err=True)
    raise typer.Exit(130)


@app.command()
def info(path: str = typer.Argument(..., help="feature store (.h5)"),
         verify: bool = typer.Option(False, "--verify", help="re-read every dataset and compare its sha256 checksum")):
    """Print a store's attributes, fields, labels, skipped samples and integrity (exit 2 if it is damaged).

    Example: sail info features/cc3m/dinov2-l.h5 --verify
    """
    from sail.data.store import describe, verify as run_verify

    text, problems = describe(path, run_verify(path) if verify else None)
    typer.echo(text)
    if problems:
        raise SailError(f"{path} is damaged: {'; '.join(problems)}; extract it again")


# ----------------------------------------------------------------------------------------- eval

eval_app = typer.Typer(no_args_is_help=True, help="Measure a run: zero-shot, retrieval, Winoground, probes, segmentation.\n\n"
                       "Example: sail eval zeroshot runs/cc3m --data imagenet/val --classnames imagenet")
app.add_typer(eval_app, name="eval")


def _report(task: str, result: dict, out: Optional[str], run: Optional[str]) -> None:
    """Print a small table and save the numbers as JSON next to the run (or where --out says)."""
    from pathlib import Path

    def line(k, v, width):
        return f"  {k:<{width}}  {v:.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}"

    flat = {k: v for k, v in result.items() if not isinstance(v, dict)}
    typer.echo(f"{task}")
    for k, v in flat.items():
        typer.echo(line(k, v, max(len(k) for k in flat)))
    for name, table in result.items():  # e.g. per_class_iou: one row per class
        if isinstance(table, dict) and table:
            typer.echo(f"{name}")
            for k, v in table.items():
                typer.echo(line(str(k), "-" if v is None else v, max(len(str(k)) for k in table)))
    path = Path(out) if out else (Path(run) / "eval" / f"{task}.json" if run else Path(f"eval-{task}.json"))
    from sail.core.artifacts import write_json

    write_json(path, result, indent=1, default=str)  # never a half-written results file
    typer.echo(f"saved {path}")


_RUN = typer.Argument(..., help="run directory (config.json + model.safetensors)")
_OUT = typer.Option(None, "--out", help="JSON file for the results (default RUN/eval/TASK.json)")
_DEVICE = typer.Option("auto", help="auto, cpu, cuda, cuda:N")
_FEATURES = typer.Option("features", "--features-root", help="root folder of cached feature stores")
_VISION = typer.Option(None, "--vision-model", help="local copy of the run's vision encoder")
_TEXT = typer.Option(None, "--text-model", help="local copy of the run's text encoder")
_ENCODING = typer.Option("utf-8", help="text encoding of a CSV/TSV/JSONL/JSON data file (e.g. latin-1, cp1252, utf-16)")


@eval_app.command("zeroshot")
def eval_zeroshot(run: str = _RUN,
                  data: str = typer.Option(..., help="labelled images: class folders, a manifest with a label column, a CLIP_benchmark webdataset folder, or 'sample-val'"),
                  classnames: Optional[str] = typer.Option(None, help="'imagenet' or a file (default: the dataset's class names)"),
                  templates: Optional[str] = typer.Option(None, help="built-in set (imagenet, cifar10, food101, ...) or a file, one template with {} per line (default: a CLIP_benchmark folder's own, else imagenet)"),
                  image_store: Optional[str] = typer.Option(None, help="use these image features instead of extracting"),
                  split: str = typer.Option("test", help="split of a CLIP_benchmark webdataset folder"),
                  out: Optional[str] = _OUT, overwrite: bool = _OVERWRITE, device: str = _DEVICE, vision_model: Optional[str] = _VISION,
                  text_model: Optional[str] = _TEXT, features_root: str = _FEATURES, encoding: str = _ENCODING):
    """Zero-shot classification with template ensembles: top-1, top-5, mean per-class recall.

    Example: sail eval zeroshot runs/cc3m --data imagenet/val --classnames imagenet
    """
    _check_out(out, overwrite)
    from sail.eval.tasks import zeroshot

    _report("zeroshot", zeroshot(run, data, classnames, templates, image_store, features_root=features_root,
                                 device=device, vision_model=vision_model, text_model=text_model, split=split,
                                 encoding=encoding), out, run)


@eval_app.command("retrieval")
def eval_retrieval(run: str = _RUN,
                   data: str = typer.Option(..., help="manifest (caption columns / rows per image), Karpathy JSON, COCO captions JSON, or CLIP_benchmark retrieval folder"),
                   images_root: Optional[str] = typer.Option(None, help="image folder for JSON inputs (default: the JSON's folder)"),
                   split: str = typer.Option("test", help="Karpathy or CLIP_benchmark split"),
                   columns: Optional[str] = typer.Option(None, help="caption columns of a manifest"),
                   out: Optional[str] = _OUT, overwrite: bool = _OVERWRITE, device: str = _DEVICE, vision_model: Optional[str] = _VISION,
                   text_model: Optional[str] = _TEXT, features_root: str = _FEATURES, encoding: str = _ENCODING):
    """Image-text retrieval R@1/5/10 in both directions (several captions per image).

    Example: sail eval retrieval runs/cc3m --data coco/dataset_coco.json --images-root coco/
    """
    _check_out(out, overwrite)
    from sail.eval.tasks import retrieval

    _report("retrieval", retrieval(run, data, images_root, split, _split(columns), features_root=features_root,
                                   device=device, vision_model=vision_model, text_model=text_model,
                                   encoding=encoding), out, run)


@eval_app.command("winoground")
def eval_winoground(run: str = _RUN, data: str = typer.Option(..., help="Winoground examples.jsonl"),
                    images: Optional[str] = typer.Option(None, help="image folder (default: images/ beside the jsonl)"),
                    out: Optional[str] = _OUT, overwrite: bool = _OVERWRITE, device: str = _DEVICE, vision_model: Optional[str] = _VISION,
                    text_model: Optional[str] = _TEXT, encoding: str = _ENCODING):
    """Winoground text, image and group scores.

    Example: sail eval winoground runs/cc3m --data winoground/examples.jsonl
    """
    _check_out(out, overwrite)
    from sail.eval.tasks import winoground

    _report("winoground", winoground(run, data, images, device, vision_model, text_model, encoding), out, run)


@eval_app.command("linear-probe")
def eval_linear_probe(train: str = typer.Option(..., help="labelled train store"), test: str = typer.Option(..., help="labelled test store"),
                      run: Optional[str] = typer.Option(None, help="project through this run's image head first"),
                      out: Optional[str] = _OUT, overwrite: bool = _OVERWRITE, device: str = _DEVICE):
    """Logistic regression on frozen features; weight decay chosen on a validation split.

    Example: sail eval linear-probe --train features/cars-train/dinov2-l.h5 --test features/cars-test/dinov2-l.h5
    """
    _check_out(out, overwrite)
    from sail.eval.tasks import linear_probe

    _report("linear-probe", linear_probe(train, test, run, device=device), out, run)


@eval_app.command("knn")
def eval_knn(train: str = typer.Option(..., help="labelled train store"), test: str = typer.Option(..., help="labelled test store"),
             k: int = typer.Option(20), run: Optional[str] = typer.Option(None, help="project through this run's image head first"),
             out: Optional[str] = _OUT, overwrite: bool = _OVERWRITE, device: str = _DEVICE):
    """k-nearest-neighbour classification (exact cosine neighbours, weighted votes).

    Example: sail eval knn --train features/cars-train/dinov2-l.h5 --test features/cars-test/dinov2-l.h5 --k 20
    """
    _check_out(out, overwrite)
    from sail.eval.tasks import knn

    _report("knn", knn(train, test, k, run, device=device), out, run)


@eval_app.command("segmentation")
def eval_segmentation(run: str = _RUN, images: str = typer.Option(..., help="folder of images"),
                      masks: str = typer.Option(..., help="folder of label masks <stem>.png"),
                      classnames: str = typer.Option(..., help="file, one class per line in mask-index order ('a, b' = synonyms)"),
                      templates: str = typer.Option("imagenet"),
                      reduce_zero_label: bool = typer.Option(False, "--reduce-zero-label", help="label 0 = ignore, others shift down by one (ADE20K, VOC20)"),
                      ignore_index: int = typer.Option(255, help="mask value never scored (VOC object boundaries)"),
                      short_side: int = typer.Option(448, help="resize images so the short side is this (0: keep)"),
                      window: int = typer.Option(448, help="sliding window size (px)"),
                      stride: int = typer.Option(224, help="sliding window stride (px)"),
                      out: Optional[str] = _OUT, overwrite: bool = _OVERWRITE, device: str = _DEVICE, vision_model: Optional[str] = _VISION,
                      text_model: Optional[str] = _TEXT):
    """Zero-shot segmentation (SAIL's sliding-window protocol): mIoU, pixel accuracy, per-class IoU.

    Example: sail eval segmentation runs/cc3m --images ADE/images/validation --masks ADE/annotations/validation --classnames ade20k.txt --reduce-zero-label
    """
    _check_out(out, overwrite)
    from sail.eval.segmentation import SegProtocol
    from sail.eval.tasks import segmentation

    protocol = SegProtocol(short_side=short_side, window=window, stride=stride,
                           reduce_zero_label=reduce_zero_label, ignore_index=ignore_index)
    _report("segmentation", segmentation(run, images, masks, classnames, templates, protocol, device=device,
                                         vision_model=vision_model, text_model=text_model), out, run)


@eval_app.command("alignment")
def eval_alignment(image: str = typer.Option(..., help="first store (e.g. image features)"),
                   text: str = typer.Option(..., help="second store (e.g. text features) over the same ids"),
                   k: int = typer.Option(10), field: Optional[str] = typer.Option(None, help="field of the second store"),
                   out: Optional[str] = _OUT, overwrite: bool = _OVERWRITE, device: str = _DEVICE):
    """How aligned two frozen feature spaces already are: mutual k-NN overlap.

    Example: sail eval alignment --image features/coco/dinov2-l.h5 --text features/coco/gte-l.h5 --k 10
    """
    _check_out(out, overwrite)
    from sail.eval.tasks import alignment

    _report("alignment", alignment(image, text, k, field, device=device), out, None)


# ----------------------------------------------------------------------------------------- hub


@app.command()
def convert(src: str = typer.Argument(..., metavar="SRC", help="official SAIL .pt, or a sail run directory"),
            out: str = typer.Option(..., "--out", help="sail run directory (--to sail) or .pt file (--to official)"),
            to: Optional[str] = typer.Option(None, "--to", help="sail | official (default: from SRC)"),
            image_model: Optional[str] = typer.Option(None, "--image-model", help="the checkpoint's vision encoder (e.g. dinov2-l)"),
            text_model: Optional[str] = typer.Option(None, "--text-model", help="its text encoder (gte-l, nv-embed-v2)"),
            overwrite: bool = _OVERWRITE):
    """Official SAIL checkpoints (lezhang7/SAIL) <-> sail runs; .pt files load as plain tensors only.

    Example: sail convert sail_dinov2l_nv2.pt --out runs/sail-nv2 --image-model dinov2-l --text-model nv-embed-v2
    """
    from sail.convert import convert as run_convert

    res = run_convert(src, out, to, image_model, text_model, overwrite)
    if "flags" in res:
        flags = " ".join(f"--{k} {v}" for k, v in res["flags"].items())
        typer.echo(f"wrote {res['out']} (official AlignmentLayer, t={res['t']:.4g}, b={res['b']:.4g}); load it with "
                   f"{flags} (SAIL-LLaVA: --vlhead_weights_path {res['out']})")
    else:
        lay = res["layout"]
        typer.echo(f"wrote {res['out']}: {lay['official']} -> sail {lay['kind']} width {lay['width']}, "
                   f"{lay['image_dim']}/{lay['text_dim']} -> {lay['out_dim']}, t={res['t']:.4g}, b={res['b']:.4g}"
                   + ("" if image_model and text_model else "; name --image-model and --text-model to load it "
                      "with SAILModel / sail eval"))


@app.command()
def push(run: str = _RUN, repo_id: str = typer.Argument(..., metavar="ORG/NAME", help="Hugging Face repository id"),
         private: bool = typer.Option(False, "--private", help="create the repository as private"),
         dry_run: Optional[str] = typer.Option(None, "--dry-run", help="only write the upload folder here; send nothing")):
    """Publish a run on the Hugging Face Hub: config, weights, model card (settings, encoders, eval, curves).

    Example: sail push runs/cc3m my-org/sail-dinov2-gte --dry-run upload/
    """
    from sail.hub import push as run_push

    where = run_push(run, repo_id, private, dry_run)
    typer.echo(f"prepared {where} (README.md is the model card); upload with: sail push {run} {repo_id}" if dry_run
               else f"pushed {run} to https://huggingface.co/{repo_id}: {where}")


@app.command()
def report(path: str = typer.Argument(..., help="run directory or sweep directory"),
           out: Optional[str] = typer.Option(None, "--out", help="HTML file (default PATH/report.html)"),
           examples: int = typer.Option(8, help="retrieval examples to show")):
    """One self-contained HTML page: curves, eval tables, confusion matrix, retrieval examples, settings.

    Example: sail report runs/demo
    """
    from sail.report import report as run_report

    typer.echo(f"wrote {run_report(path, out, examples)}")


# ----------------------------------------------------------------------------------------- search, filter, recipes, demo


@app.command()
def index(run: str = _RUN, images: str = typer.Option(..., help="image feature store to index"),
          out: str = typer.Option(..., help="index directory"), overwrite: bool = _OVERWRITE):
    """Build a faiss index of a run's projected image embeddings.

    Example: sail index runs/demo --images features/sample/efficientnet-lite0-128.h5 --out indexes/sample
    """
    from sail.eval.search import build_index

    meta = build_index(run, images, out, overwrite)
    typer.echo(f"indexed {meta['size']} images ({meta['dim']}-d) into {out}")


@app.command()
def search(index_dir: str = typer.Argument(..., metavar="INDEX"), query: str = typer.Argument(...),
           k: int = typer.Option(10, "-k", "--k", help="results to show"), device: str = _DEVICE):
    """Find the images that best match a text query.

    Example: sail search indexes/sample "a large red circle" -k 3
    """
    from sail.eval.search import search as run

    for hit in run(index_dir, query, k, device=device):
        typer.echo(f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['id']}" + (f"  {hit['path']}" if hit.get("path") else ""))


filter_app = typer.Typer(no_args_is_help=True, help="Data filters.\n\nExample: sail filter align pairs.csv --out pairs-filtered.csv")
app.add_typer(filter_app, name="filter")


@filter_app.command("align")
def filter_align_cmd(manifest: str = typer.Argument(..., help="manifest to filter (csv, tsv, jsonl)"),
                     out: str = typer.Option(..., "--out", help="filtered manifest"),
                     image_column: str = typer.Option("image"), text_column: str = typer.Option("caption"),
                     id_column: str = typer.Option("id"),
                     min_short_side: int = typer.Option(200, help="drop images whose shorter side is <= this"),
                     max_aspect: float = typer.Option(3.0, help="drop images with aspect ratio >= this"),
                     max_texts_per_image: int = typer.Option(1000), max_images_per_text: int = typer.Option(10),
                     min_unigrams: int = typer.Option(3), max_unigrams: int = typer.Option(20),
                     vocab_size: int = typer.Option(100_000, help="K most frequent unigrams+bigrams kept"),
                     encoding: str = typer.Option("utf-8", help="text encoding of the manifest (the output is UTF-8)")):
    """ALIGN's filters (image size/aspect, alt-text sharing, length, rare tokens); prints what each removed.

    Example: sail filter align pairs.csv --out pairs-filtered.csv
    """
    from sail.recipes.filter import filter_align

    report = filter_align(manifest, out, image_column=image_column, text_column=text_column, id_column=id_column,
                          min_short_side=min_short_side, max_aspect=max_aspect, max_texts_per_image=max_texts_per_image,
                          max_images_per_text=max_images_per_text, min_unigrams=min_unigrams,
                          max_unigrams=max_unigrams, vocab_size=vocab_size, encoding=encoding)
    typer.echo(report.table())


@app.command()
def curate(image: str = typer.Option(..., help="image feature store (.h5)"),
           text: str = typer.Option(..., help="text feature store (.h5) over the same ids"),
           out: str = typer.Option(..., help="ids file to write (one id per line); also OUT.report.json, OUT.clusters.png"),
           caption: Optional[str] = typer.Option(None, help="text field (default: the store's first)"),
           min_score: Optional[float] = typer.Option(None, help="stage 1: keep pairs whose image-text cosine under --run is >= S"),
           run: Optional[str] = typer.Option(None, help="aligned run for --min-score; also makes dedup keep the best-scored copy"),
           dedup: Optional[float] = typer.Option(None, help="stage 2: remove pairs with cosine >= T to a kept pair"),
           dedup_on: str = typer.Option("image", help="image | both (image AND text cosine >= T)"),
           dedup_clusters: Optional[int] = typer.Option(None, help="k-means clusters compared within (default n/1000; 1 = exact)"),
           balance: Optional[int] = typer.Option(None, help="stage 3: K text concepts (k-means)"),
           per_concept: Optional[int] = typer.Option(None, help="stage 3: keep at most N pairs per concept"),
           seed: int = typer.Option(0), device: str = typer.Option("auto", help="auto, cpu, cuda"),
           overwrite: bool = _OVERWRITE):
    """Curate pairs on cached features (score filter -> semantic dedup -> concept balance) into an ids file.

    Example: sail curate --image features/cc3m/dinov2-l.h5 --text features/cc3m/gte-l.h5 --out cc3m.ids --dedup 0.95 --balance 2000 --per-concept 1000
    """
    from sail.curate import CurateConfig, curate as run_curate

    _check_out(out, overwrite)
    report = run_curate(CurateConfig(image=image, text=text, out=out, caption=caption, min_score=min_score, run=run,
                                     dedup=dedup, dedup_on=dedup_on, dedup_clusters=dedup_clusters, balance=balance,
                                     per_concept=per_concept, seed=seed, device=device))
    typer.echo(report.table())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def recipe(ctx: typer.Context, name: str = typer.Argument(..., help="alip or align")):
    """Train a full-model recipe (ALIP, ALIGN): a shipped config name or a YAML path, plus --dotted.key overrides.

    Example: sail recipe alip --config alip-tiny --steps 20 --optim.lr 1e-4 --out runs/alip

    Shipped configs: alip-tiny, alip-vit-b32, alip-vit-b16, align-tiny, align-efficientnet-b7. The same
    command with --resume continues the run in --out from its newest checkpoint.
    """
    from sail.recipes.runner import run_recipe
    from sail.train.engine import Interrupted

    try:
        run_recipe(name, list(ctx.args))
    except Interrupted as e:  # the engine's Ctrl-C: where the run stands and the command that resumes it
        _interrupted(e)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(ctx: typer.Context, out: str = typer.Option(..., "--out", help="sweep directory (one sub-directory per run)"),
          grid: Optional[list[str]] = typer.Option(None, "--grid", help="key=v1,v2: a grid axis over any sail align option (repeatable)"),
          config: Optional[str] = typer.Option(None, "--config", help="YAML file with grid: and fixed: mappings")):
    """Many `sail align` runs over a grid (--grid KEY=V1,V2 per axis, any other sail align option fixed).

    Example: sail sweep --out sweeps/lr --grid lr=1e-4,1e-3 --image features/cc3m/dinov2-l.h5 --text features/cc3m/gte-l.h5 --steps 2000
    """
    from sail.sweep import SweepConfig, load_grid_file, parse_fixed, parse_grid, sweep as run

    axes, fixed = load_grid_file(config) if config else ({}, {})
    for name, values in parse_grid(grid or []).items():
        axes[name] = values
    fixed.update(parse_fixed(list(ctx.args)))
    if not axes:
        raise SailError("give at least one --grid key=v1,v2 (or a --config file with a grid: mapping)")
    try:
        run(SweepConfig(out=out, grid=axes, fixed=fixed))
    except KeyboardInterrupt:  # finished runs are kept; the interrupted one resumes from its last checkpoint
        import shlex

        typer.echo(f"interrupted; the finished runs in {out} are kept and the unfinished one resumes from its "
                   f"last checkpoint. Continue with:\n  sail {shlex.join(_ARGV)}", err=True)
        raise typer.Exit(130)


@app.command()
def demo(out: str = typer.Option("runs/demo", help="run directory"),
         features_root: str = typer.Option("features", help="where the feature stores go")):
    """extract -> align -> eval on the embedded sample, with models that need no download.

    Example: sail demo --out runs/demo
    """
    from pathlib import Path

    from sail.demo import run_demo

    for flag, path in (("--out", out), ("--features-root", features_root)):
        if Path(path).exists() and not Path(path).is_dir():
            raise SailError(f"{flag} {path} is a file; it must be a directory")

    run_demo(out, features_root)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: user mistakes (SailError) print one line and exit 2, with no traceback."""
    global _ARGV
    _ARGV = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = app(args=argv, prog_name="sail", standalone_mode=False)
        if isinstance(rc, int):  # click returns typer.Exit's code instead of raising it here
            return rc
    except SailError as e:
        if os.environ.get("SAIL_DEBUG", "").strip() not in ("", "0"):  # the debug switch: the full chain
            traceback.print_exception(e)
        typer.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        return 130
    except Exception as e:  # click's usage errors (typer vendors its own click, so match by shape)
        if type(e).__name__ == "NoArgsIsHelpError":  # `sail eval` alone: the help is the answer
            e.show()
            return 2
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            ctx = getattr(e, "ctx", None)
            hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            typer.echo(f"error: {e.format_message().splitlines()[0].rstrip('.')}{hint}", err=True)
            return 2
        if type(e).__name__ in ("Abort", "Exit"):
            return getattr(e, "exit_code", 1)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
