"""A house you can read from its folders (issue 17, part 4): no import circles among sail's modules, no import
running back up the layers that tools/relayout.py defines, no two modules of one name in different packages,
and every old module name still importing. The checks go through relayout's MAPPING, so they hold on the flat
layout of 0.2 and on the sub-packages after `python tools/relayout.py` alike.
(tools/relayout.py leaves this file's text alone: the old names below must stay old.)
"""

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_relayout():
    spec = importlib.util.spec_from_file_location("relayout", ROOT / "tools" / "relayout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


relayout = _load_relayout()

# what README shows users importing (`grep 'sail\.' README.md`): old dotted name -> attribute
PUBLIC = [("sail", "SAILModel"), ("sail", "AlignmentHeads"), ("sail", "FeatureStore"), ("sail", "SailError"),
          ("sail.heads", "AlignmentHeads"), ("sail.heads", "make_projection"), ("sail.losses", "sigmoid_loss"),
          ("sail.losses", "info_nce_loss"), ("sail.losses", "ConsistencyGates"), ("sail.metrics", "retrieval"),
          ("sail.data", "open_dataset"), ("sail.data", "clip_benchmark_info"), ("sail.data", "check_encoding"),
          ("sail.data", "load_image"), ("sail.checkpoint", "check_resume"), ("sail.zoo", "encoder"),
          ("sail.zoo", "efficientnet_lite0"), ("sail.model", "OpenCLIPAdapter"), ("sail.model", "SAILModel"),
          ("sail.encoders", "resolve_model"), ("sail.encoders", "pick_device"), ("sail.towers", "Towers"),
          ("sail.step", "memory_model"), ("sail.runlog", "PANELS"), ("sail.recipe", "train_towers"),
          ("sail.columns", "TextColumn"), ("sail.errors", "SailError"), ("sail.store", "FeatureStore"),
          ("sail.hub", "resolve_pretrained")]


# ---------------------------------------------------------------------------------------------- the graph


def sail_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module under root/sail by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((root / "sail").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(name: str, path: Path, known) -> list[tuple[str, bool, int]]:
    """(imported sail module, at module level?, line) for each import in the file; `from P import X` counts as
    the module P.X when that is a module, else P. Imports inside a function (or lambda) are not module level."""
    found = []
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            level = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, level, child.lineno) for a in child.names if a.name.split(".")[0] == "sail")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[: len(package) - child.level + 1] + ([base] if base else []))
                if base.split(".")[0] == "sail":
                    found.extend((f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, level, child.lineno)
                                 for a in child.names)
            visit(child, level)

    visit(ast.parse(path.read_text()), True)
    return found


def import_graph(root: Path = ROOT, module_level_only: bool = True) -> dict[str, set[str]]:
    """src -> the sail modules it imports. Imports of the package `sail` itself (its version, lazy names) are
    left out: every module runs sail/__init__.py first anyway."""
    modules = sail_modules(root)
    graph = {}
    for name, path in modules.items():
        graph[name] = {target for target, top, _ in imports_of(name, path, modules)
                       if (top or not module_level_only) and target in modules and target not in ("sail", name)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in graph), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, int, str, int]]:
    return sorted((src, relayout.layer(src), dst, relayout.layer(dst)) for src, targets in graph.items()
                  for dst in targets if relayout.layer(dst) > relayout.layer(src))


# ---------------------------------------------------------------------------------------------- the house


def test_no_import_circles_at_module_level():
    assert circles(import_graph()) == []


def test_no_import_circles_even_through_imports_inside_functions():
    assert circles(import_graph(module_level_only=False)) == []


def test_no_import_runs_back_up_a_layer():
    found = upward_imports(import_graph(module_level_only=False))
    assert found == [], "imports from a higher layer (src, its layer, dst, its layer): " + repr(found)


def test_every_top_level_module_has_a_place():
    unknown = [m for m in relayout.top_level_modules(ROOT) if m not in relayout.MAPPING]
    assert unknown == [], f"add these to tools/relayout.py MAPPING: {unknown}"


def test_no_two_modules_share_a_name_across_packages():
    names = {}
    for module in sail_modules():
        new = relayout.new_name(module)
        if new in relayout.PACKAGES or new == "sail":
            continue
        names.setdefault(new.rsplit(".", 1)[1], set()).add(new)  # sail.data (a package now) and its datasets: one
    packages = {p.rsplit(".", 1)[1] for p in relayout.PACKAGES}
    shared = {base: sorted(where) for base, where in names.items() if len(where) > 1 or base in packages}
    assert shared == {}


def test_layers_follow_the_packages():
    assert relayout.layer("sail.errors") == relayout.layer("sail.core.errors") == 0
    assert relayout.layer("sail.data") == relayout.layer("sail.data.store") == relayout.layer("sail.store") == 1
    assert relayout.layer("sail.recipes.alip") == relayout.layer("sail.recipe") == 5
    assert relayout.layer("sail.cli") == relayout.layer("sail.curate") == relayout.TOP
    assert [relayout.layer(p) for p in relayout.PACKAGES] == sorted(relayout.layer(p) for p in relayout.PACKAGES)


# ---------------------------------------------------------------------------------------------- the checks see


def _package(tmp_path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / "sail" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "sail" / name).write_text(text)
    return tmp_path


def test_the_checks_see_a_planted_circle_and_an_upward_import(tmp_path):
    root = _package(tmp_path, {"__init__.py": "from sail import __version__  # noqa\n",
                               "heads.py": "from sail.store import FeatureStore\nimport sail.cli\n",
                               "store.py": "def f():\n    from sail import heads\n", "cli.py": ""})
    top = import_graph(root)
    full = import_graph(root, module_level_only=False)
    assert top == {"sail": set(), "sail.cli": set(), "sail.heads": {"sail.store", "sail.cli"}, "sail.store": set()}
    assert circles(top) == [] and circles(full) == [["sail.heads", "sail.store"]]
    assert upward_imports(full) == [("sail.heads", 3, "sail.cli", relayout.TOP), ("sail.store", 1, "sail.heads", 3)]


def test_circles_finds_every_component():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d", "f"}, "f": set(), "g": {"g"}}
    assert circles(graph) == [["a", "b", "c"], ["d", "e"]]


# ---------------------------------------------------------------------------------------------- old names


@pytest.mark.parametrize("old", sorted(relayout.RENAMED))
def test_every_old_module_name_still_imports(old):
    if importlib.util.find_spec(old) is None:
        pytest.skip(f"{old} does not exist on this branch (a module another branch adds)")
    module = importlib.import_module(old)
    new = relayout.new_name(old)
    if new in sys.modules or _exists(new):
        assert importlib.import_module(new) is module  # one module under both names: patching either patches it


def _exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its package does not exist yet (the flat layout)
        return False


@pytest.mark.parametrize("module, name", PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_names_users_import(module, name):
    assert getattr(importlib.import_module(module), name) is not None


def test_python_dash_m_with_an_old_name():
    # `python -m sail.tiny` runs the module wherever it lives now (runpy asks the alias for the new code)
    out = subprocess.run([sys.executable, "-m", "sail.tiny"], capture_output=True, text=True, cwd=ROOT)
    assert (out.returncode, out.stderr) == (0, "")
    code = "import runpy; print(sorted(k for k in runpy.run_module('sail.tiny') if k.startswith('make_')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "['make_text_model', 'make_vision_model']", out.stderr


# ---------------------------------------------------------------------------------------------- the script


def test_rewrites_every_kind_of_reference():
    rw = relayout.rewrite
    src = ("from sail.heads import AlignmentHeads\nimport sail.step\n"
           "    from sail import heads, losses as L, __version__, data  # why\n"
           'monkeypatch.setattr("sail.step.train_step", f)\nefficientnet-lite0 = "sail.zoo:efficientnet_lite0"\n'
           "python -m sail.clip_benchmark --help  # see sail/step.py and sail/recipe_config.py\n"
           "sail.recipes.align sail.recipe.run_recipe sail.data.open_dataset sail.encoders.pick_device\n")
    want = ("from sail.train.heads import AlignmentHeads\nimport sail.train.step\n"
            "    from sail import __version__, data  # why\n    from sail.train import heads, losses as L\n"
            'monkeypatch.setattr("sail.train.step.train_step", f)\n'
            'efficientnet-lite0 = "sail.encoders.zoo:efficientnet_lite0"\n'
            "python -m sail.eval.clip_benchmark --help  # see sail/train/step.py and sail/recipes/config.py\n"
            "sail.recipes.align sail.recipes.runner.run_recipe sail.data.open_dataset sail.encoders.pick_device\n")
    assert rw(src, True) == want
    assert rw(want, True) == want  # idempotent
    assert rw("[project.entry-points.\"sail.encoders\"]", False) == "[project.entry-points.\"sail.encoders\"]"
    assert rw("import sail.heads  # relayout: keep\n", True) == "import sail.heads  # relayout: keep\n"


def test_rewritten_imports_are_sorted_by_module():
    src = "import os\nfrom sail.errors import E\nfrom sail.data import D\nfrom sail import heads\n\n" \
          "def f():\n    from sail.store import S\n    from sail.cli import C\n"
    assert relayout.rewrite(src, True) == "import os\nfrom sail.core.errors import E\nfrom sail.data import D\n" \
        "from sail.train import heads\n\ndef f():\n    from sail.cli import C\n    from sail.data.store import S\n"


def test_dry_run_plans_without_changing_anything():
    before = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout
    out = subprocess.run([sys.executable, "tools/relayout.py", "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "git mv sail/heads.py sail/train/heads.py" in out.stdout or "nothing to do" in out.stdout
    assert subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout == before


def test_refuses_a_module_it_does_not_place(tmp_path):
    _package(tmp_path, {"__init__.py": "", "heads.py": "", "brand_new.py": ""})
    (tmp_path / "pyproject.toml").write_text("")
    out = subprocess.run([sys.executable, str(ROOT / "tools/relayout.py")], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 1
    assert out.stdout == "error: sail/brand_new.py is not in tools/relayout.py MAPPING; add a line saying where it goes\n"
    assert (tmp_path / "sail/heads.py").exists()  # nothing moved


def test_an_old_name_whose_module_is_absent_is_no_module(monkeypatch):
    import sail

    moved = sys.modules.get("sail.core.moved") or sys.modules["sail.moved"]
    monkeypatch.setitem(moved.MOVED, "sail.not_here", "sail.train.not_here")
    assert importlib.util.find_spec("sail.not_here") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("sail.not_here")
    assert sail.__name__ == "sail"
