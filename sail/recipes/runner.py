"""What the end-to-end recipes (sail/recipes/alip.py, align.py) share, once: running a recipe by name, the
training loop (step, logging, checkpoints, evaluation hooks), the zero-shot check.

    run_recipe("alip", ["--config", "alip-tiny"])           # what `sail recipe` calls
    run = start_run(cfg, "alip")                             # process group, device, precision, seed
    summary = train_towers(run, towers, optimizer, scheduler, ds, columns, loss_fn, extra_modules={"gates": g})

A recipe builds its towers, optimizer, schedule and loss_fn(x, y, scale) -> (loss, {name: scalar tensor}) (scale: the temperature t) and
hands them to train_towers, which runs them through sail.train.engine.train_loop, the loop `sail align` runs too
(finite-loss guard, "no usable batch in N tries" error, Ctrl-C agreed by all ranks and checkpointed, one save):
  batch (sail.recipes.batches) -> tokenize the text columns -> sail.train.step.contrastive_backward (accum_steps
  micro-batches, whole-batch negatives) -> grad clip -> optimizer / scheduler step -> towers.clamp_() ->
  one host sync for the step's logged scalars -> metrics.jsonl (sail.train.runlog) -> every eval_every steps the
  before_eval hook (ALIGN: BatchNorm recalibration, on every rank) and a zero-shot check on held-out rows
  (rank 0) -> every checkpoint_every steps a checkpoint (sail.train.checkpoint, all ranks).
Resume rule (sail.train.checkpoint.check_resume, the same as `sail align`): an --out that holds a run is continued
only with --resume and the same settings (RESUME_KEYS); otherwise one error line, nothing overwritten.
Outputs in OUT: config.json + model.safetensors + tokenizer/ (sail.train.towers.Towers.from_pretrained, `sail
eval`), metrics.jsonl, curves.png, recipe-config.yaml, checkpoint-N/ + LATEST.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sail.core import distributed
from sail.core.artifacts import write_atomic
from sail.core.errors import SailError
from sail.train.checkpoint import check_resume

RESUME_KEYS = ("data", "batch_size", "steps", "seed", "vision", "text", "embed_dim", "projection", "image",
               "text_column", "caption_column", "holdout")


# ----------------------------------------------------------------------------------------- running


def recipe_names() -> list[str]:
    """The recipes that ship with the package: sail/recipes/NAME.py."""
    from importlib import resources

    return sorted(p.name[:-3] for p in resources.files("sail.recipes").iterdir()
                  if p.name.endswith(".py") and not p.name.startswith("_"))


def run_recipe(name: str, argv: list[str] | None = None):
    """Run sail.recipes.NAME's main(argv). Imported by name here only: the rest of sail never imports a recipe."""
    import importlib

    names = recipe_names()
    if name not in names:
        raise SailError(f"no recipe {name!r}; available: {', '.join(names) or 'none'}")
    return importlib.import_module(f"sail.recipes.{name}").main(argv)


@dataclass
class Run:
    """A started recipe run: its config, output folder, process group and precision."""

    cfg: dict
    name: str
    out: Path
    rank: int
    world: int
    device: torch.device
    precision: object  # sail.core.precision.Precision


def script(main) -> None:
    """`python -m sail.recipes.NAME ...` (and torchrun -m): run a recipe's main(); a mistake is one `error:` line
    and exit 2, as through `sail recipe`, not a traceback."""
    try:
        main()
    except SailError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def start_run(cfg: dict, name: str) -> Run:
    """Process group and device (sail.core.distributed.setup), precision (sail.core.precision), the same seed on every
    rank (identical initial weights)."""
    from sail.core.precision import resolve_precision

    rank, world, device = distributed.setup(str(cfg["device"]))
    precision = resolve_precision(str(cfg.get("precision", "auto")), device)
    if precision.needs_loss_scaling:  # the recipes have no GradScaler: fp16 gradients of B^2-averaged losses underflow
        if cfg.get("precision", "auto") != "auto":
            raise SailError("the recipes train in bf16 or fp32; --precision fp16 needs loss scaling they do not do")
        precision = resolve_precision("fp32", device)
    torch.manual_seed(cfg["seed"])
    return Run(cfg, name, Path(cfg["out"]), rank, world, device, precision)


# ----------------------------------------------------------------------------------------- the loop


# ~70 lines on purpose: the recipe's parts (data, step, log row, evaluation) handed to sail.train.engine's loop.
def train_towers(run: Run, towers, optimizer, scheduler, ds, columns: list[str], loss_fn,
                 extra_modules: dict | None = None, before_eval=None) -> dict:
    """Train `towers` for cfg["steps"] steps (see the module doc); returns a summary with "towers", "out",
    "first_loss", "last_loss" and the last zero-shot result. `columns`: the text columns per image."""
    from tqdm.auto import tqdm

    from sail.recipes.batches import PairData, iterate_batches, split_indices
    from sail.train.engine import Loop, StopRequest, train_loop
    from sail.train.runlog import MetricsLog

    cfg, out, device = run.cfg, run.out, run.device
    extra_modules = extra_modules or {}
    _check_batch(cfg, run.world)
    train_rows, held_rows = split_indices(ds.ids, cfg["holdout"])
    step, position = _resume(run, towers, optimizer, scheduler, extra_modules)
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if step else None, enabled=run.rank == 0)
    from sail.train.step import broadcast_parameters

    model = distributed.sync_batchnorm(towers, device)  # gradients averaged in the step (sail.train.step)
    broadcast_parameters(towers)  # every rank starts from rank 0's weights
    data = PairData(ds.images, [ds.captions[c] for c in columns], towers.preprocessing, seed=cfg["seed"])
    batches = iterate_batches(data, train_rows, cfg["batch_size"], cfg["seed"], position, workers=cfg["workers"],
                              pin_memory=device.type == "cuda")
    evaluate = _evaluator(run, towers, ds, held_rows, before_eval)
    bar = tqdm(total=cfg["steps"], initial=step, desc=run.name, disable=run.rank != 0 or not cfg["progress"],
               dynamic_ncols=True)
    summary = {"out": str(out), "towers": towers, "first_loss": None, "last_loss": None}
    seen = {"position": tuple(position), "skipped": 0, "reason": "", "epoch": position[0], "images": 0, "names": []}

    def items():  # batches, None where no usable batch could be made; remembers where the data stands
        for epoch, next_batch, pixels, texts, n_bad, reason in batches:
            seen.update(position=(epoch, next_batch), epoch=epoch, skipped=seen["skipped"] + n_bad)
            seen["reason"] = reason or seen["reason"]
            yield None if pixels is None else (pixels, texts)

    def step_fn(item, step: int) -> torch.Tensor:
        pixels, texts = item
        seen["images"], seen["lr"] = pixels.shape[0], optimizer.param_groups[0]["lr"]  # the rate this step uses
        seen["values"], seen["names"] = _train_step(run, model, towers, optimizer, scheduler, loss_fn, pixels, texts)
        return seen["values"]

    def on_log(step: int, since: int, seconds: float, checkpoint: bool) -> None:
        scalars = dict(zip(seen["names"], seen["values"].tolist()))  # the one host sync of the step
        record = {"step": step, "epoch": seen["epoch"], "lr": seen["lr"], **scalars, "skipped": seen["skipped"],
                  "world": run.world, "images_per_s": seen["images"] * run.world / max(seconds, 1e-9)}
        summary["first_loss"] = record["loss"] if summary["first_loss"] is None else summary["first_loss"]
        summary["last_loss"] = record["loss"]
        log.log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", t=f"{record['t']:.2f}")
        if cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == cfg["steps"]):
            summary.update(evaluate(step, log, bar))

    loop = Loop(out, towers, optimizer, scheduler, cfg["steps"], step, extra_modules=extra_modules,
                checkpoint_every=cfg["checkpoint_every"], keep=cfg["keep_checkpoints"], world=run.world, bar=bar,
                hint="try a lower --optim.lr", position=lambda: list(seen["position"]),
                unusable_cause=lambda: _unusable_cause(seen["reason"]))
    stop = StopRequest()
    towers.train()
    try:
        with run.precision.scope():  # TF32 as the precision wants, for this run only
            train_loop(loop, items(), step_fn, on_log, stop)
    finally:
        stop.restore()
        bar.close()
    _finish(run, towers, ds, before_eval)
    return summary


def _check_batch(cfg: dict, world: int) -> None:
    """Refuse settings that can never make a usable batch (or a schedule), before any data is read."""
    steps = cfg["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SailError(f"--steps {steps} is invalid: give a whole number of steps, at least 1")
    if cfg["batch_size"] < 2 * world:
        raise SailError(f"--batch-size {cfg['batch_size']} is too small: a contrastive batch needs at least 2 pairs "
                        f"per process ({2 * world} for {world} process{'es' if world > 1 else ''})")


def _unusable_cause(reason: str) -> str:
    """The likely cause of batches without 2 loadable images: the images themselves, named by the last failure."""
    if reason:
        return (f"the images of whole batches failed to load (last: {reason}); check the image paths or the "
                "image root of the manifest")
    return "every batch kept fewer than 2 pairs; raise --batch-size"


def _resume(run: Run, towers, optimizer, scheduler, extra_modules: dict) -> tuple[int, tuple[int, int]]:
    """(step, data position) to start from, restoring a checkpoint under the resume rule; writes the config."""
    import yaml

    from sail.train.engine import restore

    cfg = run.cfg
    free = tuple(k for k in cfg if k not in RESUME_KEYS)
    ck = check_resume(run.out, "recipe-config.yaml", cfg, bool(cfg.get("resume")), free)
    distributed.barrier()  # every rank has read OUT before rank 0 writes the config
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        write_atomic(run.out / "recipe-config.yaml", yaml.safe_dump(cfg, sort_keys=False))
    if ck is None:
        return 0, (0, 0)
    restore(ck, towers, optimizer, scheduler, extra_modules=extra_modules)
    return ck.step, tuple(ck.position)


def _train_step(run: Run, model, towers, optimizer, scheduler, loss_fn, pixels, texts) -> tuple[torch.Tensor, list]:
    """One optimizer step: (the logged scalars stacked on the device, their names); loss first, read by the
    engine's finite check and at log points with ONE host sync."""
    from sail.train.step import contrastive_backward

    cfg, device = run.cfg, run.device
    tokens = towers.tokenize([text for column in texts for text in column])  # columns stacked: (C*B, L)
    optimizer.zero_grad(set_to_none=True)
    loss, logs = contrastive_backward(model, pixels.to(device, non_blocking=True), tokens["input_ids"].to(device),
                                      tokens["attention_mask"].to(device), loss_fn, cfg["accum_steps"],
                                      autocast=run.precision.autocast)
    clip = cfg["optim"]["grad_clip"]
    grad_norm = torch.nn.utils.clip_grad_norm_(towers.parameters(), clip if clip else float("inf"))
    optimizer.step()
    scheduler.step()
    towers.clamp_()
    names = ["loss", "grad_norm", "t", *logs]
    values = torch.stack([v.detach().float().reshape(()).to(device) for v in
                          (loss, grad_norm, towers.scale(), *logs.values())])
    return values, names


def _evaluator(run: Run, towers, ds, held_rows: list[int], before_eval):
    """eval(step, log, bar) -> zero-shot result: before_eval on every rank, the check on rank 0."""
    templates = zeroshot_templates(run.cfg["zeroshot_templates"])

    def evaluate(step: int, log, bar) -> dict:
        if before_eval is not None:
            before_eval()  # every rank: SyncBatchNorm layers talk to each other
        zs = zeroshot_check(towers, ds, held_rows, templates) if run.rank == 0 else {}
        if zs:
            log.log({"step": step, **zs})
            bar.write(f"step {step}: zero-shot top-1 {zs['zeroshot_top1']:.1f}% on {len(held_rows)} held-out rows")
        return zs

    return evaluate


def _finish(run: Run, towers, ds, before_eval) -> None:
    from sail.train.runlog import plot_curves

    if before_eval is not None:
        before_eval()
    if run.rank == 0:
        towers.save_pretrained(run.out, metadata={"steps": run.cfg["steps"], "data": ds.name})
        plot_curves(run.out / "metrics.jsonl", run.out / "curves.png")
        print(f"saved {run.out} (load with sail.train.towers.Towers.from_pretrained); curves in {run.out / 'curves.png'}")
    distributed.cleanup()


# ----------------------------------------------------------------------------------------- zero-shot check


def zeroshot_templates(spec) -> list[str]:
    """A list of templates as given, or a built-in set name / file for sail.eval.templates.load_templates."""
    from sail.eval.templates import load_templates

    return load_templates(spec) if isinstance(spec, str) else [str(t) for t in spec]


def zeroshot_check(towers, ds, rows: list[int], templates: list[str]) -> dict:
    """sail.core.metrics.zeroshot of `towers` on rows of a labelled dataset, class names from the dataset."""
    from sail.core.metrics import class_embeddings, zeroshot
    from sail.data import ImageError, load_image

    images, labels = [], []
    for i in rows:
        if ds.labels is None or ds.labels[i] < 0:
            continue
        try:
            images.append(load_image(ds.images[i]))
        except ImageError:
            continue
        labels.append(int(ds.labels[i]))
    if not images:
        return {}
    names = ds.class_names or [str(c) for c in range(int(max(labels)) + 1)]
    classes = class_embeddings(towers.encode_text, names, templates)
    result = zeroshot(towers.encode_image(images), classes, torch.tensor(labels))
    return {f"zeroshot_{k}": v for k, v in result.items()}
