"""`sail sweep`: many `sail align` runs over a grid of settings, compared in one leaderboard.

    sail sweep --out sweeps/heads --image features/cc3m/dinov2-l.h5 --text features/cc3m/gte-l.h5 \\
               --grid head=linear,mlp,glu --grid lr=1e-4,1e-3 --steps 2000 --batch 32768
    sail sweep --out sweeps/t --config grid.yaml        # grid: {init_scale: [10, 20]}; fixed: {image: ..., ...}

Any `sail align` option can be a grid axis (`--grid key=v1,v2`; list values such as captions join with
`+`: `--grid captions=caption,caption+long_caption`) or a fixed setting (`--key value`). Every run
gets its own directory named from its settings (`head-glu_lr-0.001`). The features are read from the
stores once per process and shared, read-only, by every run (`sail.data.loader.shared_loads`). Rerunning
the command skips finished runs and resumes unfinished ones from their last checkpoint; a run whose
files are damaged, or whose stores changed since it trained, is moved aside (`NAME.stale`) and trained
again, saying so; a run that fails with a user-facing error (a NaN loss at a high learning rate, say)
is recorded and the sweep goes on, but a sweep whose every run failed exits with an error. Another
grid into the same folder adds its runs: `sweep.json` lists every grid swept there and the
leaderboard ranks all their runs. One sweep at a time writes a folder (a lock). At the end `leaderboard.csv`, `leaderboard.json` (settings, final loss, val R@1 both ways,
steps, seconds; best mean val R@1 first) and `comparison.png` are written to the sweep directory.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import re
import time
from pathlib import Path

from sail.core.artifacts import DamagedArtifact, Lock, read_json, write_atomic, write_json
from sail.core.errors import SailError
from sail.data.loader import shared_loads
from sail.data.store import FeatureStore
from sail.train.align_heads import _RESUME_FREE, _STORE_FLAGS, AlignConfig, _check_same_stores, align

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
        return _typed(name, kind, value)
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


def _typed(name: str, kind: str, value):
    """A YAML (or sweep.json) value that is not a string, checked against the field's type like a flag is."""
    ok = None
    if value is None:
        ok = None if "None" in kind else ...
    elif kind.startswith("bool"):
        ok = value if isinstance(value, bool) else ...
    elif kind.startswith("int"):
        ok = int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() else ...
    elif kind.startswith("float"):
        ok = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else ...
    elif kind.startswith("tuple"):
        good = isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ok = tuple(float(v) for v in value) if good else ...
    elif kind.startswith("list"):
        ok = [str(v) for v in value] if isinstance(value, (list, tuple)) else ...
    elif kind.startswith("str") and isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = str(value)
    else:
        ok = ...
    if ok is ...:
        raise SailError(f"--{name.replace('_', '-')}: {value!r} is not a valid {kind}")
    return ok


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


MAX_NAME = 120  # file names may be 255 bytes; room for suffixes such as `.stale`


def run_name(settings: dict) -> str:
    """{'head': 'glu', 'lr': 0.001} -> 'head-glu_lr-0.001' (the grid's key order); a name too long for a
    file name is cut and ends with a hash of the whole, so distinct settings keep distinct names."""
    name = "_".join(f"{k.replace('_', '-')}-{_label(v)}" for k, v in settings.items()) or "run"
    if len(name.encode()) > MAX_NAME:
        name = name.encode()[:MAX_NAME - 11].decode("utf-8", "ignore") + "~" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


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
        run = AlignConfig(**{**cfg.fixed, **settings, "out": str(Path(cfg.out) / name), "progress": cfg.progress})
        try:
            run.validate()  # every grid point, before the first run starts
        except SailError as e:
            raise SailError(f"grid point {name}: {e}") from None
        runs.append((name, settings, run))
    names = [n for n, _, _ in runs]
    if len(set(names)) != len(names):
        raise SailError("two grid points get the same run name; make the grid values distinct")
    return runs


def _state(run: AlignConfig, stores: dict) -> tuple[str, str]:
    """(finished | unfinished | new | stale, why); a run trained with other settings is an error. Stale: its
    files are damaged or its stores changed since it trained, so its results no longer stand."""
    d = Path(run.out)
    saved = d / "train_config.json"
    if not saved.exists():
        return "new", ""
    try:
        old = read_json(saved, what="run settings")
        new = run.resolved()
        diff = [k for k in new if k not in _RESUME_FREE and old.get(k) != new[k]]
        if diff:
            raise SailError(f"{d} was trained with other settings ({', '.join(diff)} differ); "
                            "use another --out for a different sweep")
        stored = old.get("stores")
        for f in _STORE_FLAGS:  # each store opened once per sweep
            if getattr(run, f) and getattr(run, f) not in stores:
                stores[getattr(run, f)] = FeatureStore(getattr(run, f))
        _check_same_stores(d, stored if isinstance(stored, dict) else {},
                           {f: stores[getattr(run, f)] for f in _STORE_FLAGS if getattr(run, f)})
        if not (d / "model.safetensors").exists():
            return "unfinished", ""
        read_json(d / "summary.json", what="run summary", required=("steps",))
        read_json(d / "config.json", what="model config")
    except DamagedArtifact as e:
        return "stale", str(e).split("; ")[0]
    except SailError as e:
        if "changed since the run started" not in str(e) and "is another store" not in str(e):
            raise
        return "stale", str(e).split(": ", 1)[-1].split("; ")[0]
    return "finished", ""


def _set_aside(d: Path, why: str) -> None:
    """Move a stale run out of the way (kept as NAME.stale, replacing an older one) so it trains afresh."""
    import shutil

    aside = d.with_name(d.name + ".stale")
    shutil.rmtree(aside, ignore_errors=True)
    d.rename(aside)
    print(f"  {why}: training it again (the old files are in {aside})", flush=True)


def sweep(cfg: SweepConfig) -> list[dict]:
    """Run (or finish) every grid point; returns the leaderboard rows, best first."""
    runs = plan(cfg)
    out = Path(cfg.out)
    with Lock(out, what="sweep"):
        states, stores = {}, {}
        for name, _, run in runs:  # all checked (and refused) before anything is written
            states[name] = _state(run, stores)
        _record_grid(out, cfg)
        counts = {s: sum(v[0] == s for v in states.values()) for s in ("finished", "unfinished", "stale")}
        print(f"sweep: {len(runs)} runs in {out} ({counts['finished']} finished, {counts['unfinished']} to resume, "
              f"{counts['stale']} to train again)", flush=True)
        with shared_loads():
            for i, (name, settings, run) in enumerate(runs, 1):
                state, why = states[name]
                if state != "finished":
                    print(f"[{i}/{len(runs)}] {name}" + (" (resuming)" if state == "unfinished" else ""), flush=True)
                    if state == "stale":
                        _set_aside(Path(run.out), why)
                    _train(run, settings, resume=state == "unfinished")
        rows = leaderboard(cfg.out, _all_runs(out, runs))
    print(leaderboard_table(rows))
    print(f"leaderboard: {out / 'leaderboard.csv'}  {out / 'leaderboard.json'}  plot: {out / 'comparison.png'}")
    mine = [r for r in rows if r["run"] in states]
    if mine and all(r["status"].startswith("failed") for r in mine):
        raise SailError(f"every run of the sweep failed (first: {mine[0]['run']}: {mine[0]['status'][8:]}); "
                        "fix the settings and run the command again")
    return rows


def _train(run: AlignConfig, settings: dict, resume: bool) -> None:
    """One grid point, with its status and time recorded in RUN/sweep_run.json."""
    timing = Path(run.out) / "sweep_run.json"
    try:
        before = read_json(timing, what="sweep run record", required=("seconds",))["seconds"] if timing.exists() else 0.0
    except DamagedArtifact:
        before = 0.0  # only the time spent so far is lost; it is written again below
    tick = time.time()
    try:
        with Lock(run.out, what="sweep run"):
            align(run, resume=resume)
        status = "done"
    except SailError as e:
        status = f"failed: {e}"
        print(f"  {status}", flush=True)
    write_json(timing, {"settings": settings, "status": status, "seconds": before + time.time() - tick},
               indent=None, default=list)


def _record_grid(out: Path, cfg: SweepConfig) -> None:
    """sweep.json lists every grid swept into this folder (a new one is added, none replaced)."""
    entry = {"grid": cfg.grid, "fixed": cfg.fixed}
    past = _past_grids(out)
    if _canonical(entry) not in [_canonical(e) for e in past]:
        past.append(entry)
    write_json(out / "sweep.json", {"sweeps": past}, indent=1, default=list)


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=list)


def _past_grids(out: Path) -> list[dict]:
    """The grids recorded in OUT/sweep.json; a damaged file is reported and rebuilt from this sweep on."""
    if not (out / "sweep.json").exists():
        return []
    try:
        blob = read_json(out / "sweep.json", what="sweep record")
    except DamagedArtifact as e:
        print(f"  {str(e).split('; ')[0]}: writing it again", flush=True)
        return []
    entries = blob.get("sweeps", [blob] if "grid" in blob else [])
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("grid"), dict)]


def _all_runs(out: Path, runs: list) -> list:
    """This sweep's runs plus those of earlier grids recorded in sweep.json (that still plan)."""
    seen, every = {name for name, _, _ in runs}, list(runs)
    for entry in _past_grids(out):
        try:
            grid = {option_name(k): [parse_value(option_name(k), v) for v in vs] for k, vs in entry["grid"].items()}
            fixed = {option_name(k): parse_value(option_name(k), v) for k, v in (entry.get("fixed") or {}).items()}
            others = plan(SweepConfig(str(out), grid, fixed, progress=False))
        except (SailError, AttributeError, TypeError):
            continue  # a grid from an older sail whose options no longer exist
        for r in others:
            if r[0] not in seen:
                seen.add(r[0])
                every.append(r)
    return every


# ------------------------------------------------------------------------------------------ results


def leaderboard(sweep_dir: str | Path, runs: list[tuple[str, dict, AlignConfig]]) -> list[dict]:
    """Collect every run's summary into leaderboard.csv / .json and draw comparison.png."""
    out = Path(sweep_dir)
    rows = []
    for name, settings, run in runs:
        d = Path(run.out)
        summary, timing = _optional(d / "summary.json", "run summary"), _optional(d / "sweep_run.json", "sweep run record")
        status = str(timing.get("status", "done" if summary else "not run"))
        rows.append({"run": name, **{k: _plain(v) for k, v in settings.items()}, "status": status,
                     "loss": summary.get("loss"), "val_i2t_R@1": summary.get("val_i2t_R@1"),
                     "val_t2i_R@1": summary.get("val_t2i_R@1"), "steps": summary.get("steps"),
                     "seconds": round(timing["seconds"], 2) if isinstance(timing.get("seconds"), (int, float)) else None})

    def score(r):
        vals = [r[k] for k in ("val_i2t_R@1", "val_t2i_R@1") if r[k] is not None]
        return (r["status"] == "done", sum(vals) / len(vals) if vals else float("-inf"), -(r["loss"] or float("inf")))

    rows.sort(key=score, reverse=True)
    write_json(out / "leaderboard.json", rows, indent=1)
    columns = list(dict.fromkeys(k for r in rows for k in r)) or ["run"]  # runs of several grids: every axis
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    write_atomic(out / "leaderboard.csv", text.getvalue())
    plot_comparison(out, [(name, Path(run.out)) for name, _, run in runs])
    return rows


def _optional(path: Path, what: str) -> dict:
    """A run file for the leaderboard: {} when absent or damaged (the run then shows as not run / without numbers)."""
    try:
        return read_json(path, what=what) if path.exists() else {}
    except DamagedArtifact as e:
        print(f"  {str(e).split('; ')[0]}; its run is listed without it", flush=True)
        return {}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def leaderboard_table(rows: list[dict]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "status"]
    table = [keys] + [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    failed = [f"  {r['run']}: {r['status']}" for r in rows if r["status"] not in ("done",)]
    return "\n".join(lines + (["not finished:"] + failed if failed else []))


def plot_comparison(out: Path, runs: list[tuple[str, Path]]) -> Path:
    """Loss and validation R@1 (both directions) against step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sail.train.runlog import read_metrics

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

