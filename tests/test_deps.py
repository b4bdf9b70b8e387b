"""Declared dependencies: every third-party module sail imports comes from a package pyproject.toml declares
(in `dependencies` or an extra), every range has an upper bound, and the lock (requirements/lock.txt) pins
each declared package, with hashes, at a version inside its range."""
import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# lock entries look like "name==version \" followed by "    --hash=sha256:..." lines
LOCK_ENTRY = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+) \\\n((?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", re.M)


def imported_modules(package: Path = ROOT / "sail") -> dict[str, list[str]]:
    """Top-level names of absolute imports in every .py under `package` -> the files importing them."""
    found: dict[str, list[str]] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], []).append(f"{path.relative_to(package.parent)}:{node.lineno}")
    return found


def third_party(modules: dict[str, list[str]]) -> dict[str, list[str]]:
    return {m: where for m, where in modules.items() if m not in sys.stdlib_module_names and m != "sail"}


def declared() -> dict[str, Requirement]:
    """Every requirement of pyproject.toml, core and extras, by canonical distribution name."""
    lines = list(PYPROJECT["dependencies"])
    for extra in PYPROJECT.get("optional-dependencies", {}).values():
        lines += extra
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def lock(name: str = "lock.txt") -> dict[str, tuple[str, int]]:
    """requirements/<name> -> {canonical name: (version, number of hashes)}."""
    text = (ROOT / "requirements" / name).read_text()
    return {canonicalize_name(n): (v, h.count("--hash=")) for n, v, h in LOCK_ENTRY.findall(text)}


def test_every_imported_third_party_module_is_declared():
    """Fails naming the module and the importing file:line when sail imports a package pyproject omits."""
    dists = importlib.metadata.packages_distributions()
    names = declared()
    problems = []
    for module, where in sorted(third_party(imported_modules()).items()):
        owners = {canonicalize_name(d) for d in dists.get(module, [])}
        if not owners:
            problems.append(f"{module} (imported at {', '.join(where)}) is not installed, so no package provides "
                            "it: add its distribution to pyproject.toml and requirements (make lock)")
        elif not owners & names.keys():
            problems.append(f"{module} (imported at {', '.join(where)}) comes from {', '.join(sorted(owners))}, "
                            "which pyproject.toml does not declare: add it to dependencies (or to an extra "
                            "if the import is optional), then `make lock`")
    assert not problems, "\n".join(problems)


def test_the_scan_sees_through_lazy_and_dotted_imports(tmp_path):
    """The walker finds imports inside functions and `from a.b import c`, and skips relative ones."""
    (tmp_path / "m.py").write_text("import os\nfrom a.b import c\nfrom . import d\n"
                                   "def f():\n    import e.f as g\n    from h import i\n")
    found = imported_modules(tmp_path)
    assert {m: len(w) for m, w in found.items()} == {"os": 1, "a": 1, "e": 1, "h": 1}
    assert found["h"] == [f"{tmp_path.name}/m.py:6"]
    assert set(third_party(found)) == {"a", "e", "h"}


def test_huggingface_hub_is_a_declared_core_dependency():
    """sail.hub and the encoders import it outside any extra: it was only pulled in through transformers."""
    core = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["dependencies"]}
    assert "huggingface-hub" in core


def test_every_range_has_an_upper_bound():
    """`pip install sail` must not take a major release nobody tested."""
    unbounded = [str(r) for r in declared().values()
                 if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert not unbounded, f"add an upper bound (the next untested major) to: {unbounded}"


def test_the_lock_pins_every_declared_package_inside_its_range_with_hashes():
    """The lock and pyproject agree: run `make lock` after editing either."""
    pins = lock() | lock("lock-nodeps.txt")
    assert len(pins) > 40 and all(n >= 1 for _, n in pins.values())
    text = (ROOT / "requirements" / "lock.txt").read_text()
    assert text.count("==") == len(lock()), "an entry of lock.txt lacks --hash lines"
    problems = []
    for name, req in declared().items():
        if name not in pins:
            problems.append(f"{name} is declared but not in requirements/lock*.txt")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{name}=={pins[name][0]} in the lock is outside pyproject's {req}")
    # the lock must not silently widen: the CPU torch build is what the Makefile promises
    assert pins["torch"][0].endswith("+cpu")
    assert not problems, "\n".join(problems) + "\nrun `make lock`"


@pytest.mark.skipif(Path(sys.prefix).resolve() != ROOT / ".venv", reason="runs in the .venv `make setup` built")
def test_the_installed_environment_is_the_lock():
    """What `make test` runs with is what the lock says (a drifted .venv: `make setup` again)."""
    drift = []
    for name, (version, _) in (lock() | lock("lock-nodeps.txt")).items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            drift.append(f"{name}=={version} is not installed")
            continue
        if have != version:
            drift.append(f"{name}: installed {have}, locked {version}")
    assert not drift, "\n".join(drift)
