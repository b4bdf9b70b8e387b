"""`sail sweep`: many `sail align` runs over a grid of settings, compared in one leaderboard.

    sail sweep --out sweeps/heads --image features/cc3m/dinov2-l.h5 --text features/cc3m/gte-l.h5 \\
               --grid head=linear,mlp,glu --grid lr=1e-4,1e-3 --steps 2000 --batch 32768
    sail sweep --out sweeps/t --config grid.yaml        # grid: {init_scale: [10, 20]}; fixed: {image: ..., ...}

Any `sail align` option can be a grid axis (`--grid key=v1,v2`; list values such as captions join with
`+`: `--grid captions=caption,caption+long_caption`) or a fixed setting (`--key value`). Every run
gets its own directory named from its settings (`head-glu_lr-0.001`). The features are read from the
stores once per process and shared, read-only, by every run (`sail.loader.shared_loads`). Rerunning
the command skips finished runs and resumes unfinished ones from their last checkpoint; a run that
fails with a user-facing error (a NaN loss at a high learning rate, say) is recorded and the sweep
goes on. At the end `leaderboard.csv`, `leaderboard.json` (settings, final loss, val R@1 both ways,
steps, seconds; best mean val R@1 first) and `comparison.png` are written to the sweep directory.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import re
import time
from pathlib import Path

from sail.align import _RESUME_FREE, AlignConfig, align
from sail.errors import SailError
from sail.loader import shared_loads

FIELDS = {f.name: f for f in dataclasses.fields(AlignConfig)}
NOT_SETTABLE = {"out", "progress"}
LEADERBOARD_KEYS = ("loss", "val_i2t_R@1", "val_t2i_R@1", "steps", "seconds")


# ------------------------------------------------------------------------------------------ settings


ALIASES = {"width_factor": "width"}  # `sail align` flag names that differ from their AlignConfig field


def option_name(key: str) -> str:
    """'--init-scale' / 'init-scale' / 'init_scale' -> 'init_scale', checked against AlignConfig."""
    name = key.lstrip("-").replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in FIELDS or name in NOT_SETTABLE:
        valid = ", ".join(k.replace("_", "-") for k in FIELDS if k not in NOT_SETTABLE)
        raise SailError(f"unknown sail align option {key!r} in the sweep; use one of: {valid}")
    return name


def parse_value(name: str, value):
    """A string from the command line (or a YAML value) -> the type AlignConfig declares for `name`."""
    kind = str(FIELDS[name].type)
    if not isinstance(value, str):
        if isinstance(value, list) and kind.startswith("tuple"):
            return tuple(float(v) for v in value)
        return value
    text = value.strip()
    try:
        if "None" in kind and text.lower() in ("none", "null", ""):
            return None
        if kind.startswith("list"):
            return [v for v in re.split(r"[+,]", text) if v]
        if kind.startswith("tuple"):
            return tuple(float(v) for v in re.split(r"[+,]", text))
        if kind.startswith("int"):
            return int(float(text)) if float(text).is_integer() else int(text)
        if kind.startswith("float"):
            return float(text)
        if kind == "bool":
            if text.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "yes", "1")
    except ValueError:
        raise SailError(f"--{name.replace('_', '-')}: {value!r} is not a valid {kind}") from None
    return text


def parse_grid(items: list[str]) -> dict[str, list]:
    """['lr=1e-3,1e-4', 'head=glu'] -> {'lr': [0.001, 0.0001], 'head': ['glu']}."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise SailError(f"--grid {item!r}: write key=value1,value2 (for example --grid lr=1e-4,1e-3)")
        key, values = item.split("=", 1)
        name = option_name(key)
        if name in grid:
            raise SailError(f"--grid {key} is given twice; list all its values in one --grid")
        parsed = [parse_value(name, v) for v in values.split(",") if v.strip()]
        if not parsed:
            raise SailError(f"--grid {item!r} has no values")
        grid[name] = parsed
    return grid


def parse_fixed(args: list[str]) -> dict:
    """['--steps', '100', '--image=a.h5'] -> {'steps': 100, 'image': 'a.h5'} (any sail align option)."""
    fixed, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise SailError(f"unexpected argument {arg!r}; fixed settings are written --option value")
        if "=" in arg:
            key, value = arg.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise SailError(f"{arg} needs a value")
            key, value = arg, args[i + 1]
            i += 2
        name = option_name(key)
        fixed[name] = parse_value(name, value)
    return fixed


def load_grid_file(path: str) -> tuple[dict[str, list], dict]:
    """A YAML file with `grid:` (option -> list of values) and optionally `fixed:` (option -> value)."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise SailError(f"grid file {path} not found")
    try:
        blob = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SailError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("grid"), dict) or set(blob) - {"grid", "fixed"}:
        raise SailError(f"{path} must hold a mapping `grid:` (option: [values]) and optionally `fixed:` (option: value)")
    grid = {}
    for key, values in blob["grid"].items():
        name = option_name(str(key))
        values = values if isinstance(values, list) else [values]
        grid[name] = [parse_value(name, v) for v in values]
    fixed = {option_name(str(k)): parse_value(option_name(str(k)), v) for k, v in (blob.get("fixed") or {}).items()}
    return grid, fixed


def _label(value) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_label(v) for v in value)
    return re.sub(r"[^\w.+-]+", "-", f"{value:g}" if isinstance(value, float) else str(value))


def run_name(settings: dict) -> str:
    """{'head': 'glu', 'lr': 0.001} -> 'head-glu_lr-0.001' (the grid's key order)."""
    return "_".join(f"{k.replace('_', '-')}-{_label(v)}" for k, v in settings.items()) or "run"


def expand(grid: dict[str, list]) -> list[dict]:
    """Every combination, the last axis varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


# ------------------------------------------------------------------------------------------ running


@dataclasses.dataclass
class SweepConfig:
    out: str
    grid: dict[str, list]
    fixed: dict = dataclasses.field(default_factory=dict)
    progress: bool = True


def plan(cfg: SweepConfig) -> list[tuple[str, dict, AlignConfig]]:
    """(name, settings, AlignConfig) for every run; all checked before the first one starts."""
    both = set(cfg.grid) & set(cfg.fixed)
    if both:
        raise SailError(f"{', '.join(sorted(both))} is both a grid axis and a fixed setting; give it once")
    for need in ("image", "text"):
        if need not in cfg.fixed and need not in cfg.grid:
            raise SailError(f"the sweep needs --{need} STORE (a fixed setting, as for sail align)")
    runs = []
    for settings in expand(cfg.grid):
        name = run_name(settings)
        runs.append((name, settings, AlignConfig(**{**cfg.fixed, **settings, "out": str(Path(cfg.out) / name),
                                                    "progress": cfg.progress})))
    names = [n for n, _, _ in runs]
    if len(set(names)) != len(names):
        raise SailError("two grid points get the same run name; make the grid values distinct")
    return runs


def _state(run: AlignConfig) -> str:
    """finished | unfinished | new; a finished run trained with other settings is an error."""
    d = Path(run.out)
    saved = d / "train_config.json"
    if not saved.exists():
        return "new"
    old, new = json.loads(saved.read_text()), run.resolved()
    diff = [k for k in new if k not in _RESUME_FREE and old.get(k) != new[k]]
    if diff:
        raise SailError(f"{d} was trained with other settings ({', '.join(diff)} differ); "
                        "use another --out for a different sweep")
    return "finished" if (d / "summary.json").exists() and (d / "model.safetensors").exists() else "unfinished"


def sweep(cfg: SweepConfig) -> list[dict]:
    """Run (or finish) every grid point; returns the leaderboard rows, best first."""
    runs = plan(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"grid": cfg.grid, "fixed": cfg.fixed}, indent=1, default=list))
    states = {name: _state(run) for name, _, run in runs}
    print(f"sweep: {len(runs)} runs in {out} ({sum(s == 'finished' for s in states.values())} finished, "
          f"{sum(s == 'unfinished' for s in states.values())} to resume)", flush=True)
    with shared_loads():
        for i, (name, settings, run) in enumerate(runs, 1):
            if states[name] == "finished":
                continue
            print(f"[{i}/{len(runs)}] {name}" + (" (resuming)" if states[name] == "unfinished" else ""), flush=True)
            timing = Path(run.out) / "sweep_run.json"
            before = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
            tick = time.time()
            try:
                align(run, resume=states[name] == "unfinished")
                status = "done"
            except SailError as e:
                status = f"failed: {e}"
                print(f"  {status}", flush=True)
            Path(run.out).mkdir(parents=True, exist_ok=True)
            timing.write_text(json.dumps({"settings": settings, "status": status,
                                          "seconds": before + time.time() - tick}, default=list))
    rows = leaderboard(cfg.out, runs)
    print(leaderboard_table(rows))
    print(f"leaderboard: {out / 'leaderboard.csv'}  {out / 'leaderboard.json'}  plot: {out / 'comparison.png'}")
    return rows


# ------------------------------------------------------------------------------------------ results


def leaderboard(sweep_dir: str | Path, runs: list[tuple[str, dict, AlignConfig]]) -> list[dict]:
    """Collect every run's summary into leaderboard.csv / .json and draw comparison.png."""
    out = Path(sweep_dir)
    rows = []
    for name, settings, run in runs:
        d = Path(run.out)
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        timing = json.loads((d / "sweep_run.json").read_text()) if (d / "sweep_run.json").exists() else {}
        status = timing.get("status", "done" if summary else "not run")
        rows.append({"run": name, **{k: _plain(v) for k, v in settings.items()}, "status": status,
                     "loss": summary.get("loss"), "val_i2t_R@1": summary.get("val_i2t_R@1"),
                     "val_t2i_R@1": summary.get("val_t2i_R@1"), "steps": summary.get("steps"),
                     "seconds": round(timing["seconds"], 2) if "seconds" in timing else None})

    def score(r):
        vals = [r[k] for k in ("val_i2t_R@1", "val_t2i_R@1") if r[k] is not None]
        return (r["status"] == "done", sum(vals) / len(vals) if vals else float("-inf"), -(r["loss"] or float("inf")))

    rows.sort(key=score, reverse=True)
    (out / "leaderboard.json").write_text(json.dumps(rows, indent=1))
    columns = list(rows[0]) if rows else ["run"]
    with open(out / "leaderboard.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    plot_comparison(out, [(name, Path(run.out)) for name, _, run in runs])
    return rows


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def leaderboard_table(rows: list[dict]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    keys = [k for k in (rows[0] if rows else {}) if k != "status"]
    table = [keys] + [[fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    failed = [f"  {r['run']}: {r['status']}" for r in rows if r["status"] not in ("done",)]
    return "\n".join(lines + (["not finished:"] + failed if failed else []))


def plot_comparison(out: Path, runs: list[tuple[str, Path]]) -> Path:
    """Loss and validation R@1 (both directions) against step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sail.runlog import read_metrics

    panels = [("loss", "training loss"), ("val_i2t_R@1", "val image->text R@1 (%)"),
              ("val_t2i_R@1", "val text->image R@1 (%)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, d in runs:
        records = read_metrics(d / "metrics.jsonl") if (d / "metrics.jsonl").exists() else []
        for ax, (key, _) in zip(axes, panels):
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, markersize=3, label=name)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("step")
    if any(ax.lines for ax in axes):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

