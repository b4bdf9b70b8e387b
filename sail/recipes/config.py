"""Recipe configs: one YAML file (shipped in sail/recipes/configs/ or any path) plus `--key value` overrides.

    cfg = load_config(["--config", "alip-tiny", "--steps", "20", "--vision.pretrained", "openai/clip-vit-base-patch32",
                       "--optim.lr=1e-4"])
    cfg["steps"], cfg["vision"]["pretrained"]       # a plain dict, nested like the YAML
    config_names()                                   # ['align-efficientnet-b7', 'align-tiny', 'alip-tiny', ...]

Rules
- `--config` is a name from `config_names()` (the configs that ship with the package) or a path to a YAML file.
- Overrides address nested keys with dots (`--vision.pretrained x`); dashes and underscores are the same
  (`--batch-size 8`). Values are read as YAML by OmegaConf (`--steps 10`, `--gates false`, `--lr 1e-3`,
  `--betas [0.9,0.98]`); a bare `--flag` is true (`--resume`).
- A key that is not in the file is an error naming it, except inside the open `config` sections of the
  towers (transformers kwargs: `--vision.config.hidden_dropout_prob 0.1`). A number cannot become text, and a
  whole number (steps, batch_size) cannot become a fraction (`--steps 5.7` is refused).
"""

from __future__ import annotations

from contextlib import nullcontext
from importlib import resources
from pathlib import Path

from sail.core.errors import SailError

OPEN_SECTIONS = ("vision.config", "text.config")  # free-form transformers kwargs: new keys allowed


def config_names() -> list[str]:
    """Names of the configs that ship with the package (sail/recipes/configs/NAME.yaml)."""
    folder = resources.files("sail.recipes") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_path(spec: str) -> Path:
    """A shipped config name (`alip-tiny`) or a path to a YAML file -> its path."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    shipped = resources.files("sail.recipes") / "configs" / f"{spec}.yaml"
    if "/" not in spec and shipped.is_file():
        return Path(str(shipped))
    raise SailError(f"config {spec!r} is neither a file nor a shipped config; shipped: {', '.join(config_names())}")


def _pairs(argv: list[str]) -> list[tuple[str, str]]:
    """['--a.b', 'x', '--c=y'] -> [('a.b', 'x'), ('c', 'y')]; keys with dashes turned into underscores."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise SailError(f"unexpected argument {arg!r}; use --config NAME_OR_FILE and --key value overrides")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 2
        else:  # a bare flag (`--resume`, `--gates`) is true
            key, value = arg[2:], "true"
            i += 1
        pairs.append((key.replace("-", "_"), value))
    return pairs


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_config(argv: list[str] | None) -> dict:
    """`--config NAME_OR_FILE` plus `--dotted.key value` overrides -> a plain nested dict (see module doc)."""
    from omegaconf import OmegaConf

    pairs = _pairs(list(argv or []))
    specs = [v for k, v in pairs if k == "config"]
    if len(specs) != 1:
        raise SailError(f"give exactly one --config (a file or one of: {', '.join(config_names())})")
    path = config_path(specs[0])
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError or OmegaConf's own: both mean "not a readable config"
        raise SailError(f"{path} is not a valid config ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict) and not OmegaConf.is_dict(cfg):
        raise SailError(f"{path} must hold a mapping of keys to values")
    OmegaConf.set_struct(cfg, True)  # unknown keys raise ...
    for section in OPEN_SECTIONS:  # ... except in the towers' free-form transformers kwargs
        node = OmegaConf.select(cfg, section)
        if node is not None and OmegaConf.is_dict(node):
            OmegaConf.set_struct(node, False)
    for key, value in pairs:
        if key == "config":
            continue
        _override(cfg, key, value, path)
    out = OmegaConf.to_container(cfg, resolve=True)
    out["config"] = str(path)
    return out


def _override(cfg, key: str, value: str, path: Path) -> None:
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    open_section = any(key.startswith(s + ".") for s in OPEN_SECTIONS)
    if node is None or not OmegaConf.is_dict(node) or (leaf not in node and not open_section):
        where = f"the {parent} section" if parent and node is not None and OmegaConf.is_dict(node) else path.name
        keys = sorted(node.keys()) if node is not None and OmegaConf.is_dict(node) else sorted(cfg.keys())
        raise SailError(f"unknown option --{key}; {where} has keys {', '.join(map(str, keys))}")
    try:
        new = OmegaConf.from_dotlist([f"{leaf}={value}"])[leaf]
    except OmegaConfBaseException as e:
        raise SailError(f"--{key}: cannot read {value!r} ({str(e).splitlines()[0]})") from None
    if OmegaConf.is_config(new):
        new = OmegaConf.to_container(new)
    old = node.get(leaf) if leaf in node else None
    if OmegaConf.is_dict(old) and not isinstance(new, dict):
        raise SailError(f"--{key} is a section; set its keys, e.g. --{key}.{next(iter(old.keys()), 'key')} VALUE")
    if _is_number(old) and not _is_number(new):
        raise SailError(f"--{key} needs a number, got {value!r}")
    if _is_number(old) and isinstance(old, float):
        new = float(new)
    elif _is_number(old) and isinstance(new, float):  # a count (steps, batch size): 5.7 would train 5 steps, then crash
        if not new.is_integer():
            raise SailError(f"--{key} needs a whole number, got {value!r}")
        new = int(new)
    try:
        with open_dict(node) if open_section else nullcontext():
            node[leaf] = new
    except OmegaConfBaseException as e:
        raise SailError(f"--{key}: {str(e).splitlines()[0]}") from None
