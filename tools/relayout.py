#!/usr/bin/env python3
"""Move sail's flat modules into sub-packages that show the flow (issue 17, part 4). Run once, from the repo root,
after every branch is merged:

    python tools/relayout.py --dry-run     # print the plan (moves, new packages, files whose text changes)
    python tools/relayout.py               # git mv, write the packages, rewrite every reference

Stdlib only, deterministic and idempotent: a second run finds nothing to move and nothing to rewrite. It refuses
(exit 1, naming them) when sail/ holds a top-level module that MAPPING does not place: add a line for it.

What it does:
- `git mv sail/OLD.py sail/PKG/NEW.py` for every line of MAPPING whose old file is still there;
- writes each sub-package's `__init__.py` (a docstring; sail.data and sail.encoders, whose names were modules,
  also serve the old names from their __init__, so `sail.data.open_dataset` and `sail.encoders.resolve_model`
  stay as they were);
- rewrites references in sail/, tests/, benchmarks/, tools/ (.py), README.md, Makefile, pyproject.toml and the
  recipe configs: dotted names (`from sail.heads import X`, `import sail.heads`, `"sail.step.train_step"`,
  `sail.zoo:efficientnet_lite0`, `python -m sail.clip_benchmark`), `from sail import heads, losses`, and file
  paths (`sail/step.py`);
- fills sail/core/moved.py's MOVED table (old name -> new module), so old imports keep working;
- replaces README's "Layout and module map" section with the map below and a "What moved" table.

tests/test_layout.py reads PACKAGES and MAPPING from here: the layer order holds before and after the move.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

# sub-package -> (layer, docstring). An import may only point to the same or a lower layer; top-level modules
# (the commands) are layer TOP, the package `sail` itself (version, lazy names) is below everything.
PACKAGES = {
    "sail.core": (0, "What every layer uses: errors, atomic artifacts and locks, where a run is (directory or Hub "
                     "id),\nthe device, precision and process group, the retrieval and zero-shot metrics, and the "
                     "old-name aliases\n(moved.py)."),
    "sail.data": (1, "Data in: datasets (the entry point, open_dataset) over sources (the Dataset columns), "
                     "manifests,\nWebDataset shards, CLIP_benchmark folders and image folders; images (decoding, "
                     "colour);\ncolumns, sample, augment; the HDF5 feature store and the loader that batches it."),
    "sail.encoders": (2, "Frozen encoders: the registry of aliases and Hub ids (registry.py), the ModelSpec they "
                         "resolve to\n(spec.py), custom `package.module:function` encoders (zoo.py), tiny test "
                         "models, and extract\n(data -> encoders -> feature store)."),
    "sail.train": (3, "Training: heads and towers, losses (+ the shared block pieces and the Triton kernel), the "
                      "step\n(GradCache), optimizers, checkpoints, stability, the run log, the engine, `sail align` "
                      "over\ncached features (align_heads.py), and SAILModel (model.py: encoders + trained heads)."),
    "sail.eval": (4, "Evaluation: the tasks (tasks.py), their datasets (evalsets.py), templates, segmentation, "
                     "\nthe CLIP_benchmark route and search."),
    "sail.recipes": (5, None),  # exists already, with its own docstring
}
TOP = 6

# every top-level module of sail/ -> where it lives; a module that stays on top maps to itself
MAPPING = {
    # core
    "sail.errors": "sail.core.errors",
    "sail.artifacts": "sail.core.artifacts",
    "sail.locate": "sail.core.locate",
    "sail.distributed": "sail.core.distributed",
    "sail.precision": "sail.core.precision",
    "sail.moved": "sail.core.moved",
    "sail.metrics": "sail.core.metrics",  # retrieval / zero-shot scores: train (validation), eval and recipes use them
    # data
    "sail.data": "sail.data.datasets",
    "sail.sources": "sail.data.sources",
    "sail.images": "sail.data.images",
    "sail.manifests": "sail.data.manifests",
    "sail.shards": "sail.data.shards",
    "sail.benchmark_folders": "sail.data.benchmark_folders",
    "sail.columns": "sail.data.columns",
    "sail.sample": "sail.data.sample",
    "sail.augment": "sail.data.augment",
    "sail.store": "sail.data.store",
    "sail.loader": "sail.data.loader",
    "sail.subset": "sail.data.subset",
    # encoders
    "sail.encoders": "sail.encoders.registry",
    "sail.spec": "sail.encoders.spec",
    "sail.zoo": "sail.encoders.zoo",
    "sail.tiny": "sail.encoders.tiny",
    "sail.extract": "sail.encoders.extract",
    # train
    "sail.heads": "sail.train.heads",
    "sail.towers": "sail.train.towers",
    "sail.losses": "sail.train.losses",
    "sail.loss_blocks": "sail.train.loss_blocks",
    "sail.triton_sigmoid": "sail.train.triton_sigmoid",
    "sail.step": "sail.train.step",
    "sail.gradcache": "sail.train.step",
    "sail.optim": "sail.train.optim",
    "sail.checkpoint": "sail.train.checkpoint",
    "sail.stability": "sail.train.stability",
    "sail.runlog": "sail.train.runlog",
    "sail.engine": "sail.train.engine",
    "sail.align": "sail.train.align_heads",  # not align.py: sail/recipes/align.py is the ALIGN recipe
    "sail.model": "sail.train.model",
    # eval
    "sail.evaluate": "sail.eval.tasks",
    "sail.evalsets": "sail.eval.evalsets",
    "sail.templates": "sail.eval.templates",
    "sail.segmentation": "sail.eval.segmentation",
    "sail.clip_benchmark": "sail.eval.clip_benchmark",
    "sail.search": "sail.eval.search",
    # recipes (the machinery beside the recipe scripts alip.py and align.py)
    "sail.recipe": "sail.recipes.runner",
    "sail.recipe_config": "sail.recipes.config",
    "sail.recipe_data": "sail.recipes.batches",
    "sail.filter": "sail.recipes.filter",
    # the commands, on top
    "sail.cli": "sail.cli",
    "sail.demo": "sail.demo",
    "sail.sweep": "sail.sweep",
    "sail.report": "sail.report",
    "sail.hub": "sail.hub",
    "sail.convert": "sail.convert",
    "sail.curate": "sail.curate",
}
# old module names that are now a package's name: the package's __init__ serves their names, nothing to rewrite
SERVED_BY_PACKAGE = {old: new for old, new in MAPPING.items() if new.rsplit(".", 1)[0] == old}
RENAMED = {old: new for old, new in MAPPING.items() if old != new and old not in SERVED_BY_PACKAGE}
MOVED_FILE = "sail/core/moved.py"
TEXT_FILES = ("README.md", "Makefile", "pyproject.toml")
TEXT_GLOBS = ("sail/**/*.py", "tests/**/*.py", "benchmarks/**/*.py", "tools/**/*.py", "sail/recipes/configs/*.yaml",
              "features/*.md")
RECIPES_NOTE = ("Beside the recipes: runner.py (the loop behind `sail recipe`), config.py, batches.py (image-text "
                "batches) and\nfilter.py (`sail filter`), the machinery they share.\n")
MAP_START, MAP_END = "<!-- relayout: module map -->", "<!-- /relayout: module map -->"


def new_name(module: str) -> str:
    """The module's name after the move (itself if it is already there or stays)."""
    return MAPPING.get(module, module)


def layer(module: str) -> int:
    """Layer of a module, by the package it lives in after the move (so the same answer before and after)."""
    name = new_name(module)
    if name == "sail":
        return 0
    for package, (level, _) in sorted(PACKAGES.items(), key=lambda kv: -len(kv[0])):
        if name == package or name.startswith(package + "."):
            return level
    return TOP


def module_path(module: str) -> str:
    return module.replace(".", "/") + ".py"


# ---------------------------------------------------------------------------------------------- plan


def top_level_modules(root: Path) -> list[str]:
    return sorted(f"sail.{p.stem}" for p in (root / "sail").glob("*.py") if p.stem != "__init__")


def plan_moves(root: Path) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(moves as (old path, new path), modules MAPPING does not place, paths that exist under both names)."""
    unknown = [m for m in top_level_modules(root) if m not in MAPPING]
    moves, clashes = [], []
    for old, new in MAPPING.items():
        src, dst = module_path(old), module_path(new)
        if old == new or not (root / src).is_file():
            continue
        (clashes if (root / dst).exists() else moves).append((src, dst))
    return moves, unknown, clashes


# ---------------------------------------------------------------------------------------------- rewriting


def _alternation(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=lambda n: (-len(n), n)))


_DOTTED = re.compile(r"(?<![\w.])(" + _alternation(RENAMED) + r")(?!\w)")
_PATHS = re.compile(r"(?<![\w./])(" + _alternation(module_path(m) for m, n in MAPPING.items() if m != n) + r")(?!\w)")
_PATH_TO = {module_path(m): module_path(n) for m, n in MAPPING.items() if m != n}
_FROM_SAIL = re.compile(r"^(?P<indent>[ \t]*)from sail import (?P<names>[\w ,]+?)(?P<tail>[ \t]*(?:#.*)?)$", re.M)


def _from_sail(match: re.Match) -> str:
    """`from sail import heads, losses as L` -> one `from PKG import NAME [as ALIAS]` line per package."""
    groups: dict[str, list[str]] = {}
    for item in (s.strip() for s in match["names"].split(",")):
        name, _, alias = item.partition(" as ")
        alias = alias.strip() or name
        new = RENAMED.get(f"sail.{name}")
        package, base = new.rsplit(".", 1) if new else ("sail", name)
        groups.setdefault(package, []).append(base if base == alias else f"{base} as {alias}")
    lines = [f"{match['indent']}from {package} import {', '.join(names)}" for package, names in groups.items()]
    return "\n".join(lines) + match["tail"]


KEEP = "relayout: keep"  # a line that says this keeps its old names (it is about them)
_SAIL_IMPORT = re.compile(r"(?:from|import) (sail[\w.]*)[^()\\]*$")


def _rewrite_line(line: str, python: bool) -> str:
    if KEEP in line:
        return line
    line = _DOTTED.sub(lambda m: RENAMED[m[1]], line)
    return _PATHS.sub(lambda m: _PATH_TO[m[1]], line)


def _sort_imports(lines: list[str]) -> list[str]:
    """Re-sort each run of single-line `from sail... import` / `import sail...` statements of one indent by
    module, as isort would: the new names no longer sort the way the old ones did."""
    out, run, run_indent = [], [], None
    for line in lines + [None]:  # None: the end, which closes the last run
        stripped = line.lstrip() if line is not None else ""
        indent = line[: len(line) - len(stripped)] if line is not None else None
        is_import = _SAIL_IMPORT.match(stripped) is not None
        if is_import and (not run or indent == run_indent):
            run.append(line)
            run_indent = indent
            continue
        out.extend(sorted(run, key=lambda s: _SAIL_IMPORT.match(s.lstrip()).group(1)))
        run, run_indent = ([line], indent) if is_import else ([], None)
        if not is_import and line is not None:
            out.append(line)
    return out


def rewrite(text: str, python: bool) -> str:
    lines = [_rewrite_line(line, python) for line in text.splitlines(keepends=True)]
    text = "".join(lines)
    if python or "```" in text:
        text = _FROM_SAIL.sub(_from_sail, text)
    if python:
        text = "".join(_sort_imports(text.splitlines(keepends=True)))
    return text


def rewrite_readme(text: str) -> str:
    """Rewrite README except the module-map section, which this script writes itself."""
    if MAP_START in text and MAP_END in text:
        head, rest = text.split(MAP_START, 1)
        body, tail = rest.split(MAP_END, 1)
        return rewrite(head, False) + MAP_START + body + MAP_END + rewrite(tail, False)
    return rewrite(text, False)


def text_files(root: Path) -> list[Path]:
    found = {root / f for f in TEXT_FILES if (root / f).is_file()}
    for pattern in TEXT_GLOBS:
        found.update(p for p in root.glob(pattern) if p.is_file())
    # this script, the alias table, and the test that imports the old names on purpose keep their text
    skip = {root / "tools" / "relayout.py", root / MOVED_FILE, root / "sail/moved.py", root / "tests/test_layout.py"}
    skip |= {root / module_path(p).replace(".py", "/__init__.py") for p in PACKAGES if p != "sail.recipes"}
    return sorted(p for p in found if p not in skip)


# ---------------------------------------------------------------------------------------------- writing


def package_init(package: str, doc: str) -> str:
    """A package's __init__.py: its docstring; a package that took an old module's name serves that module's
    names lazily (so `from sail.data import open_dataset` and `sail.encoders.resolve_model` keep working)."""
    served = [old for old in SERVED_BY_PACKAGE if old == package]
    text = f'"""{doc}\n"""\n'
    if served:
        home = MAPPING[served[0]]
        text += (f"\nfrom sail.core.moved import serve_old_names\n\n__getattr__ = serve_old_names(__name__, \"{home}\")"
                 f"  # {package} was one module before 0.3\n")
    return text


def moved_table(text: str) -> str:
    table = "".join(f'    "{old}": "{new}",\n' for old, new in sorted(RENAMED.items()))
    new = re.sub(r"MOVED: dict\[str, str\] = \{[^}]*\}", lambda _: "MOVED: dict[str, str] = {\n" + table + "}", text)
    if new == text and "MOVED: dict[str, str] = {" not in text:
        raise SystemExit(f"error: {MOVED_FILE} has no `MOVED: dict[str, str] = {{...}}` table to fill")
    return new


def readme_section(root: Path) -> str:
    """The README's "Layout and module map" section: the map (tools/relayout_map.md) and the what-moved table."""
    map_text = (root / "tools" / "relayout_map.md").read_text().strip()
    rows = "\n".join(f"| `{old}` | `{new}` |" for old, new in sorted(RENAMED.items()))
    served = ", ".join(f"`{m}`" for m in sorted(SERVED_BY_PACKAGE))
    return (f"{MAP_START}\n{map_text}\n\n#### What moved (0.3)\n\nEvery old name still imports (`import sail.heads`, "
            f"`from sail.losses import sigmoid_loss`, `python -m sail.clip_benchmark`, entry points "
            f"`sail.zoo:...`): sail/core/moved.py maps it to the new module, the same object. {served} are now "
            f"packages that serve their old names as before.\n\n| old | new |\n|---|---|\n{rows}\n{MAP_END}\n")


def replace_readme_map(text: str, section: str) -> str:
    if MAP_START in text and MAP_END in text:
        head, rest = text.split(MAP_START, 1)
        return head + section.rstrip("\n") + rest.split(MAP_END, 1)[1]
    start = text.index("## Layout and module map")
    nxt = text.find("\n## ", start + 1)
    end = len(text) if nxt < 0 else nxt + 1
    return text[:start] + "## Layout and module map\n\n" + section + ("\n" if nxt >= 0 else "") + text[end:]


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    args = parser.parse_args(argv)
    root = Path.cwd()
    if not (root / "sail" / "__init__.py").is_file() or not (root / "pyproject.toml").is_file():
        print("error: run from the repository root (sail/__init__.py and pyproject.toml not found here)")
        return 1
    moves, unknown, clashes = plan_moves(root)
    if unknown or clashes:
        for m in unknown:
            print(f"error: {module_path(m)} is not in tools/relayout.py MAPPING; add a line saying where it goes")
        for src, dst in clashes:
            print(f"error: both {src} and {dst} exist; merge them by hand first")
        return 1
    for src, dst in moves:
        print(f"git mv {src} {dst}")
        if not args.dry_run:
            (root / dst).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "mv", src, dst], cwd=root, check=True)
    for package, (_, doc) in PACKAGES.items():
        init = root / module_path(package).replace(".py", "/__init__.py")
        if doc is not None and not init.exists():
            print(f"write {init.relative_to(root)}")
            if not args.dry_run:
                init.parent.mkdir(parents=True, exist_ok=True)
                init.write_text(package_init(package, doc))
    changed = 0
    for path in text_files(root):
        old = path.read_text()
        new = rewrite_readme(old) if path.name == "README.md" and path.parent == root else \
            rewrite(old, path.suffix == ".py")
        if path.name == "README.md" and path.parent == root and (root / "tools" / "relayout_map.md").is_file():
            new = replace_readme_map(new, readme_section(root))
        if new != old:
            changed += 1
            print(f"rewrite {path.relative_to(root)}")
            if not args.dry_run:
                path.write_text(new)
    recipes = root / "sail/recipes/__init__.py"
    if recipes.is_file() and RECIPES_NOTE.split(":")[0] not in recipes.read_text():
        print("note in sail/recipes/__init__.py what moved beside the recipes")
        if not args.dry_run:
            text = recipes.read_text()
            head, _, tail = text.rpartition('"""')
            recipes.write_text(head.rstrip("\n") + "\n\n" + RECIPES_NOTE + '"""' + tail)
    moved = root / MOVED_FILE
    if moved.is_file() and moved_table(moved.read_text()) != moved.read_text():
        print(f"fill {MOVED_FILE}: {len(RENAMED)} old names")
        if not args.dry_run:
            moved.write_text(moved_table(moved.read_text()))
    if not (moves or changed) :
        print("nothing to do: the layout is already in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
