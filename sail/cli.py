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
