"""The `sail` command line: a thin layer over library functions a Python user can call directly.

    sail models                      list the encoder aliases
    sail extract --model M --data D  cache embeddings in a feature store
    sail info STORE                  print everything a store says about itself
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from sail.errors import SailError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sail: vision-language alignment tuning on frozen unimodal encoders.")


def _split(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@app.command()
def models():
    """List the encoder aliases with modality and feature dimension."""
    from sail.encoders import models_table

    typer.echo(models_table())
    typer.echo("\nAny Hugging Face id or local model directory works too; modality is inferred (force with --modality).")


@app.command()
def extract(
    model: str = typer.Option(..., help="alias (see `sail models`), Hugging Face id, or local model directory"),
    data: str = typer.Option(..., help="manifest (csv/tsv/jsonl/parquet), .tar shard(s) folder, image folder, or 'sample'"),
    columns: Optional[str] = typer.Option(None, help="caption columns for text models, comma-separated (default: caption[,long_caption])"),
    out: Optional[str] = typer.Option(None, help="store path (default features/<dataset>/<model>.h5)"),
    pooling: str = typer.Option("concat", help="image pooling: concat ([CLS; mean patch]), cls, mean"),
    patch_tokens: bool = typer.Option(False, "--patch-tokens", help="also store patch tokens (for segmentation)"),
    max_length: Optional[int] = typer.Option(None, help="text token limit (default: the model's maximum)"),
    modality: Optional[str] = typer.Option(None, help="force image or text"),
    batch_size: int = typer.Option(64, help="items per forward pass"),
    chunk_size: int = typer.Option(2048, help="rows per crash-safe part file"),
    workers: Optional[int] = typer.Option(None, help="image decoding workers (default: cores - 1)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    id_column: str = typer.Option("id", help="manifest id column"),
    image_column: str = typer.Option("image", help="manifest image-path column (relative to the manifest)"),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code/--no-trust-remote-code",
                                                     help="allow model code from the hub (default: per alias)"),
):
    """Run a frozen encoder once over a dataset and store its embeddings (resumable, crash-safe)."""
    from sail.extract import ExtractConfig, extract as run

    result = run(ExtractConfig(model=model, data=data, columns=_split(columns), out=out, pooling=pooling,
                               patch_tokens=patch_tokens, max_length=max_length, modality=modality,
                               batch_size=batch_size, chunk_size=chunk_size, workers=workers, device=device,
                               id_column=id_column, image_column=image_column, trust_remote_code=trust_remote_code))
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(result.summary())


@app.command()
def align(
    image: str = typer.Option(..., help="image feature store (.h5)"),
    text: str = typer.Option(..., help="text feature store (.h5) over the same ids"),
    out: str = typer.Option(..., help="run directory"),
    captions: Optional[str] = typer.Option(None, help="caption fields, comma-separated (default: first field; all for multi-positive)"),
    loss: str = typer.Option("sigmoid", help="sigmoid | multi-positive | info-nce"),
    average: str = typer.Option("pairs", help="sigmoid normalisation: pairs (/B^2, SAIL) or rows (/B, SigLIP)"),
    head: str = typer.Option("glu", help="linear | mlp | glu"),
    width: int = typer.Option(4, help="hidden width factor (paper 4, official scripts 8)"),
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
    in_memory: str = typer.Option("auto", help="auto | yes | no (stream from the stores)"),
    checkpoint_every: int = typer.Option(500, help="steps between checkpoints"),
    eval_every: int = typer.Option(500, help="steps between validation R@1"),
    block_size: Optional[int] = typer.Option(None, help="loss block rows (default: automatic)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
):
    """Train alignment heads on cached features; writes config.json + model.safetensors."""
    from sail.align import AlignConfig, align as run

    result = run(AlignConfig(image=image, text=text, out=out, captions=_split(captions), loss=loss, average=average,
                             head=head, width=width, out_dim=out_dim, activation=activation, batch=batch, epochs=epochs,
                             steps=steps, optimizer=optimizer, lr=lr, weight_decay=weight_decay, betas=(beta1, beta2),
                             warmup=warmup, init_scale=init_scale, init_bias=init_bias, val_fraction=val_fraction,
                             val_image=val_image, val_text=val_text, seed=seed, device=device, in_memory=in_memory,
                             checkpoint_every=checkpoint_every, eval_every=eval_every, block_size=block_size),
                 resume=resume)
    if result.metrics:
        typer.echo(result.summary())


@app.command()
def info(path: str = typer.Argument(..., help="feature store (.h5)")):
    """Print a store's attributes, fields, labels and skipped samples."""
    from sail.store import describe

    typer.echo(describe(path))


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: user mistakes (SailError) print one line and exit 2, with no traceback."""
    try:
        app(args=argv, prog_name="sail", standalone_mode=False)
    except SailError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        return 130
    except Exception as e:  # click's own usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
