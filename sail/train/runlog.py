"""Per-step training logs shared by `sail align` and the recipes: metrics.jsonl and curves.png.

    log = MetricsLog(run / "metrics.jsonl", resume_step=step_or_None, enabled=rank == 0)
    log.log({"step": 1, "loss": 0.5})
    plot_curves(run / "metrics.jsonl", run / "curves.png")      # the one panel set, PANELS

PANELS is the one curves definition for align and the recipes; a panel whose keys are not in the log
is left out, so each run draws what it logged.
"""

from __future__ import annotations

import json
from pathlib import Path

from sail.core.artifacts import write_atomic


class MetricsLog:
    """Append-only metrics.jsonl (rank 0). Resuming at step s drops lines logged after s, so the log
    always matches the weights; a fresh run (resume_step None) starts it empty."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            records = []
        else:
            records = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if self.path.is_file() else []
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash (or otherwise not a JSON object) is
    skipped, since every other line still stands on its own."""
    records = []
    for ln in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(ln) if ln.strip() else None
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


PANELS = [(("loss", "loss_ungated"), "training loss"), (("lr",), "learning rate"), (("t", "b"), "temperature t, bias b"),
          (("pos_logit", "neg_logit"), "logits"), (("val_i2t_R@1", "val_t2i_R@1"), "val R@1 (%)"),
          (("zeroshot_top1",), "zero-shot top-1 (%)"), (("pos_grad_share",), "positives' share of the gradient")]


def plot_curves(metrics_path: str | Path, png_path: str | Path,
                panels: list[tuple[tuple[str, ...], str]] | None = None) -> Path:
    """One panel per (metric keys, title) that has data (default PANELS), each metric against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    logged = {k for r in records for k in r}
    panels = [p for p in (PANELS if panels is None else panels) if logged & set(p[0])] or [(("loss",), "loss")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    axes = axes[0]
    for ax, (keys, title) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, label=key)
        if len(ax.lines) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
