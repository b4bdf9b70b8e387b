"""`sail report`: one self-contained HTML page for a run or a sweep (images inlined, no scripts).

    sail report runs/demo              # -> runs/demo/report.html
    sail report sweeps/heads           # a sweep directory: leaderboard + comparison plot + each run's curves

A run page shows its settings and encoders, the final training metrics, the training curves, every
eval table in RUN/eval/*.json, and, when RUN/eval/predictions.json exists (the demo writes it), a
zero-shot confusion matrix and retrieval examples with thumbnails (the query, its top-5 images, the
correct one outlined). Open the file anywhere: every image is a data: URI.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from sail.core.artifacts import damaged, read_json, write_atomic
from sail.core.errors import SailError

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}td.num{text-align:right}table.cm td{text-align:center;padding:2px 4px;min-width:1.6em}table.cm td.z{color:#ccc}
.thumbs img{margin:2px;border:3px solid transparent}.thumbs img.hit{border-color:#2a2}.query{margin:.6em 0 .1em}
img.plot{max-width:100%}"""


def _e(v) -> str:
    return html.escape(str(v))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v))
    return str(v)


def _table(rows, header=None, numeric=True) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for c in row:
            cls = ' class="num"' if numeric and isinstance(c, (int, float)) and not isinstance(c, bool) else ""
            cells.append(f"<td{cls}>{_e(_fmt(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_file(path: Path, alt: str) -> str:
    return f'<img class="plot" alt="{_e(alt)}" src="{data_uri(path.read_bytes())}">' if path.exists() else ""


def _thumbnail(ref: str, size: int = 72) -> str | None:
    """An image path (or tar:// reference) -> a small PNG data URI; None when unreadable."""
    from sail.data import ImageError, load_image

    try:
        image = load_image(ref)
    except (ImageError, OSError):
        return None
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return data_uri(buf.getvalue())


def _read_json(path: Path, what: str, expect: type = dict, required: tuple = ()):
    """None when absent; a damaged file stops the report with one line naming it (never a silently thinner page)."""
    if not path.exists():
        return None
    return read_json(path, what=what, expect=expect, required=required,
                     todo="delete it or rerun the command that wrote it, then run sail report again")


# ------------------------------------------------------------------------------------------ run sections


def confusion(labels: list[int], predicted: list[int], classes: int) -> list[list[int]]:
    """counts[true][predicted]."""
    counts = [[0] * classes for _ in range(classes)]
    for t, p in zip(labels, predicted):
        counts[t][p] += 1
    return counts


def _confusion_section(zs: dict) -> str:
    names, labels = zs["class_names"], zs["labels"]
    pred = [t[0] for t in zs["top5"]]
    counts = confusion(labels, pred, len(names))
    unseen = set(zs.get("unseen", []))
    top = max(1, max(max(r) for r in counts))
    rows = ["<table class=\"cm\"><tr><th>true \\ predicted</th>" +
            "".join(f"<th title=\"{_e(n)}\">{i}</th>" for i, n in enumerate(names)) + "</tr>"]
    for i, row in enumerate(counts):
        label = f"{i} {names[i]}" + (" (unseen)" if names[i] in unseen else "")
        cells = []
        for j, c in enumerate(row):
            shade = int(255 - 200 * c / top)
            colour = f"rgb({shade},{shade},255)" if i == j else f"rgb(255,{shade},{shade})"
            cells.append(f"<td style=\"background:{colour}\">{c}</td>" if c else "<td class=\"z\">0</td>")
        rows.append(f"<tr><th>{_e(label)}</th>" + "".join(cells) + "</tr>")
    acc = 100 * sum(counts[i][i] for i in range(len(names))) / max(1, len(labels))
    return (f"<h2>Zero-shot confusion matrix</h2><p>{len(labels)} images, {len(names)} classes, top-1 {acc:.1f}%"
            + (f"; unseen in training: {_e(', '.join(sorted(unseen)))}" if unseen else "") + "</p>"
            + "\n".join(rows) + "</table>")


def _retrieval_section(rt: dict, examples: int) -> str:
    out = [f"<h2>Retrieval examples</h2><p>text &rarr; image, top 5; the correct image is outlined in green "
           f"(first {examples} of {len(rt['queries'])} queries)</p>"]
    cache: dict[int, str | None] = {}
    for q in range(min(examples, len(rt["queries"]))):
        out.append(f"<p class=\"query\">{_e(rt['queries'][q])}</p><div class=\"thumbs\">")
        for k in rt["top5"][q]:
            if k not in cache:
                cache[k] = _thumbnail(rt["images"][k])
            hit = ' class="hit"' if k == rt["truth"][q] else ""
            if cache[k]:
                out.append(f"<img{hit} alt=\"image {k}\" title=\"image {k}\" src=\"{cache[k]}\">")
        out.append("</div>")
    return "\n".join(out)


def run_sections(run: Path, examples: int = 8) -> list[str]:
    from sail.train.model import read_run_config

    cfg = read_run_config(run)
    parts = []
    summary = _read_json(run / "summary.json", "run summary") or {}
    if summary:
        parts.append("<h2>Final training metrics</h2>" + _table(sorted(summary.items())))
    curves = _png_file(run / "curves.png", "training curves")
    if curves:
        parts.append("<h2>Training curves</h2>" + curves)
    for path in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        if path.stem == "predictions":
            continue
        blob = _read_json(path, "evaluation results")
        rows = [(k, v) for k, v in blob.items() if isinstance(v, (int, float, str)) or
                (isinstance(v, list) and all(isinstance(x, str) for x in v))]
        parts.append(f"<h2>Evaluation: {_e(path.stem)}</h2>" + _table(rows, ("metric", "value")))
    pred = _read_json(run / "eval" / "predictions.json", "evaluation predictions") or {}
    try:
        if pred.get("zeroshot", {}).get("top5"):
            parts.append(_confusion_section(pred["zeroshot"]))
        if pred.get("retrieval", {}).get("top5"):
            parts.append(_retrieval_section(pred["retrieval"], examples))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise damaged(run / "eval" / "predictions.json", "evaluation predictions", f"unexpected layout: {e!r}"[:120],
                      "delete it or rerun the evaluation, then run sail report again") from None
    enc = [(side, e.get("model_id"), e.get("model_revision"), e.get("pooling"), e.get("dim"))
           for side, e in (("image", cfg.get("image_encoder", {})), ("text", cfg.get("text_encoder", {})))]
    parts.append("<h2>Encoders</h2>" + _table(enc, ("modality", "model", "revision", "pooling", "dim")))
    settings = _read_json(run / "train_config.json", "run settings") or {}
    heads = {k: cfg.get(k) for k in ("kind", "image_dim", "text_dim", "out_dim", "width", "activation") if k in cfg}
    parts.append("<h2>Settings</h2>" + _table(sorted({**settings, **{f"heads.{k}": v for k, v in heads.items()}}.items()),
                                             ("setting", "value")))
    return parts


# ------------------------------------------------------------------------------------------ pages


def _page(title: str, parts: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _is_sweep(path: Path) -> bool:
    return (path / "leaderboard.json").exists() or (path / "sweep.json").exists()


def report(path: str | Path, out: str | Path | None = None, examples: int = 8) -> Path:
    """Write the page for a run or a sweep directory; returns its path (default PATH/report.html)."""
    path = Path(path)
    if not path.is_dir():
        raise SailError(f"{path} is not a directory; give a run (sail align --out) or a sweep (sail sweep --out)")
    if _is_sweep(path):
        rows = _read_json(path / "leaderboard.json", "sweep leaderboard", list)
        if rows is None:
            raise SailError(f"{path} has no leaderboard.json yet; rerun the sail sweep command to finish it")
        if not all(isinstance(r, dict) and isinstance(r.get("run"), str) for r in rows):
            raise damaged(path / "leaderboard.json", "sweep leaderboard", "rows without a run name",
                          "rerun the sail sweep command to rebuild it")
        keys = list(dict.fromkeys(k for r in rows for k in r)) or ["run"]
        parts = ["<h2>Leaderboard</h2><p>best mean validation R@1 first</p>" +
                 _table([[r.get(k) for k in keys] for r in rows], keys)]
        comparison = _png_file(path / "comparison.png", "comparison of runs")
        if comparison:
            parts.append("<h2>Comparison</h2>" + comparison)
        grid = _read_json(path / "sweep.json", "sweep record") or {}
        for entry in grid.get("sweeps", [grid]):  # one entry per grid swept into the folder
            if isinstance(entry, dict) and isinstance(entry.get("fixed"), dict) and entry["fixed"]:
                parts.append("<h2>Fixed settings</h2>" + _table(sorted(entry["fixed"].items()), ("setting", "value")))
        for r in rows:
            curves = _png_file(path / r["run"] / "curves.png", f"{r['run']} curves")
            if curves:
                parts.append(f"<h2>Run {_e(r['run'])}</h2>" + curves)
        title = f"sail sweep {path.name}"
    else:
        if not (path / "config.json").exists() and not (path / "train_config.json").exists():
            raise SailError(f"{path} is neither a sail run (config.json) nor a sweep (leaderboard.json)")
        if not (path / "config.json").exists():
            raise SailError(f"{path} is an unfinished run (no config.json yet); finish it with sail align --resume")
        parts = run_sections(path, examples)
        title = f"sail run {path.name}"
    target = Path(out) if out else path / "report.html"
    write_atomic(target, _page(title, parts))
    return target
