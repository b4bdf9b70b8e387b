"""Official SAIL checkpoints (lezhang7/SAIL) <-> sail runs, both ways, without running pickled code.

The official `AlignmentLayer` state dict (written from our reading of its layout, no code copied):

    vision_layer_norm.{weight,bias}    LayerNorm on the image features      -> image_head.norm
    vision_mapping_network.*           the image mapping (below)            -> image_head.*
    text_layer_norm.*, text_mapping_network.*   the same for text           -> text_head.*
    logit_scale (1,) = log t, logit_bias (1,) = b                           -> logit_scale (), logit_bias ()

    mapping "star":   f1, f2, g: g(ReLU6(clip(f1 x)) * clip(f2 x)), clip = +-1e3, width factor = f1 rows / in
                      -> sail `glu` (w1, w2, w_out), activation relu6, clamp 1e3
    mapping "mlp":    proj.0 (Linear 4x), GELU, proj.2      -> sail `mlp` (fc1, fc2), width 4
    mapping "linear": weight, bias (one nn.Linear)         -> sail `linear` (proj)

The trainer saves `{"epoch", "name", "state_dict", "optimizer"[, "scaler"]}` per epoch, the state dict
with DDP's `module.` prefix when trained distributed; SAIL-LLaVA reads the same dict (keys may also carry
`model.vlhead.`). Released: sail_dinov2l_gte.pt (DINOv2-L + gte-large-en-v1.5), sail_dinov2l_nv2.pt
(DINOv2-L + NV-Embed-v2), both star, width factor 8, out 1024.

    import_official("sail_dinov2l_nv2.pt", "runs/sail-nv2", image_model="dinov2-l", text_model="nv-embed-v2")
    export_official("runs/mine", "mine.pt")      # for `--vlhead_weights_path` / `--head-weights-path`
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch

from sail.core.artifacts import atomic_path
from sail.core.errors import SailError
from sail.train.heads import AlignmentHeads

STAR_CLAMP = 1e3  # the official star mapping clips both branches to +-1e3 before the product
OFFICIAL_MLP_WIDTH = 4  # SiglipMLP's intermediate size is 4 x input, not configurable from AlignmentLayer
# official mapping parameter names -> (sail kind, sail parameter names)
LAYOUTS = {
    "star": ("glu", {"f1.weight": "w1.weight", "f1.bias": "w1.bias", "f2.weight": "w2.weight", "f2.bias": "w2.bias",
                     "g.weight": "w_out.weight", "g.bias": "w_out.bias"}),
    "mlp": ("mlp", {"proj.0.weight": "fc1.weight", "proj.0.bias": "fc1.bias",
                    "proj.2.weight": "fc2.weight", "proj.2.bias": "fc2.bias"}),
    "linear": ("linear", {"weight": "proj.weight", "bias": "proj.bias"}),
}
SIDES = (("vision", "image_head"), ("text", "text_head"))
PREFIXES = ("module.", "model.vlhead.", "_orig_mod.")  # DDP, SAIL-LLaVA, torch.compile


# ------------------------------------------------------------------------------------------ reading .pt


def load_official(path: str | Path) -> tuple[dict, dict]:
    """(state dict of tensors, trainer info {"epoch", "name"}) of an official .pt; never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise SailError(f"{path} not found; give an official SAIL checkpoint (.pt) or a sail run directory")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError) as e:
        text = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        why = f"it needs the pickled class {found.group(1)}" if found else text.strip().splitlines()[0][:160]
        raise SailError(f"{path} cannot be read as plain tensors ({why}); sail loads .pt files with "
                        "weights_only=True and never runs pickled code: re-save it as a dict of tensors") from None
    info = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info = {k: obj[k] for k in ("epoch", "name") if isinstance(obj.get(k), (int, str))}
        obj = obj["state_dict"]  # the optimizer / scaler state is not needed
    if not isinstance(obj, dict) or not obj:
        raise SailError(f"{path} holds a {type(obj).__name__}, not a state dict (or a trainer dict with one)")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SailError(f"{path}: entries {bad[:4]} are not tensors; this is not an alignment layer's state dict")
    return _strip_prefixes(obj), info


def _strip_prefixes(state: dict) -> dict:
    for prefix in PREFIXES:  # only when every key has it: a prefix on some keys is another layout
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def infer_layout(state: dict, source: str = "checkpoint") -> dict:
    """Head kind, width and dims from the shapes; SailError naming any layout that is not AlignmentLayer's."""
    if any(k.startswith("text_mapping_network.layers.") for k in state):
        raise SailError(f"{source} is a ShareLock alignment layer (text_mapping_network.layers.*: a BatchNorm MLP on "
                        "the text side only); sail converts AlignmentLayer checkpoints (linear types star, mlp, "
                        "linear) only")
    found = {}
    for side, _ in SIDES:
        sub = {k[len(side) + 17:]: v for k, v in state.items() if k.startswith(f"{side}_mapping_network.")}
        names = set(sub)
        kinds = [n for n, (_, params) in LAYOUTS.items() if set(params) == names]
        if not kinds:
            what = "missing" if not names else f"of an unknown linear type (parameters {sorted(names)})"
            raise SailError(f"{source}: {side}_mapping_network is {what}; sail converts the official AlignmentLayer "
                            "with both towers and linear type star, mlp or linear")
        for part in ("weight", "bias"):
            if f"{side}_layer_norm.{part}" not in state:
                raise SailError(f"{source}: {side}_layer_norm.{part} is missing; not an official AlignmentLayer")
        found[side] = (kinds[0], sub)
    if found["vision"][0] != found["text"][0]:
        raise SailError(f"{source}: the towers use different linear types ({found['vision'][0]} / "
                        f"{found['text'][0]}); official AlignmentLayer uses one for both")
    extra = sorted(set(state) - _official_keys(found))
    if extra:
        raise SailError(f"{source}: unexpected parameters {extra[:6]}; not an official AlignmentLayer state dict")
    return _dims(found, state, source)


def _official_keys(found: dict) -> set:
    keys = {"logit_scale", "logit_bias"}
    for side, (_, sub) in found.items():
        keys |= {f"{side}_mapping_network.{k}" for k in sub} | {f"{side}_layer_norm.weight", f"{side}_layer_norm.bias"}
    return keys


def _dims(found: dict, state: dict, source: str) -> dict:
    kind = found["vision"][0]
    layout = {"official": kind, "kind": LAYOUTS[kind][0], "width": 4, "activation": "relu6", "clamp": None}
    for side, (_, sub) in found.items():
        first = sub["weight" if kind == "linear" else "f1.weight" if kind == "star" else "proj.0.weight"]
        last = sub["weight" if kind == "linear" else "g.weight" if kind == "star" else "proj.2.weight"]
        in_dim, out_dim = first.shape[1], last.shape[0]
        layout[f"{'image' if side == 'vision' else 'text'}_dim"] = in_dim
        if layout.setdefault("out_dim", out_dim) != out_dim:
            raise SailError(f"{source}: the towers map to different widths ({layout['out_dim']} / {out_dim})")
        if kind != "linear":
            if first.shape[0] % in_dim:
                raise SailError(f"{source}: {side} hidden width {first.shape[0]} is not a multiple of its input "
                                f"{in_dim}; sail heads use width x input")
            layout.setdefault("widths", set()).add(first.shape[0] // in_dim)
    if len(layout.pop("widths", {4})) != 1:
        raise SailError(f"{source}: the two towers have different width factors")
    if kind != "linear":
        layout["width"] = found["vision"][1]["f1.weight" if kind == "star" else "proj.0.weight"].shape[0] // \
            layout["image_dim"]
    if kind == "star":
        layout["clamp"] = STAR_CLAMP
    for name in ("logit_scale", "logit_bias"):
        if name not in state or state[name].numel() != 1:
            raise SailError(f"{source}: {name} is missing or not one number")
    return layout


# ------------------------------------------------------------------------------------------ both directions


def official_to_heads(state: dict, source: str = "checkpoint") -> tuple[AlignmentHeads, dict]:
    """An official AlignmentLayer state dict -> sail AlignmentHeads (float32) with the same embeddings."""
    layout = infer_layout(state, source)
    heads = AlignmentHeads(layout["image_dim"], layout["text_dim"], layout["out_dim"], layout["kind"],
                           layout["width"], layout["activation"], clamp=layout["clamp"])
    _, names = LAYOUTS[layout["official"]]
    ours = {"logit_scale": state["logit_scale"].reshape(()), "logit_bias": state["logit_bias"].reshape(())}
    for side, head in SIDES:
        ours[f"{head}.norm.weight"] = state[f"{side}_layer_norm.weight"]
        ours[f"{head}.norm.bias"] = state[f"{side}_layer_norm.bias"]
        for theirs, mine in names.items():
            ours[f"{head}.{mine}"] = state[f"{side}_mapping_network.{theirs}"]
    heads.load_state_dict({k: v.detach().float() for k, v in ours.items()}, strict=True)
    return heads.eval(), layout


def heads_to_official(heads: AlignmentHeads) -> tuple[dict, dict]:
    """sail heads -> (official AlignmentLayer state dict, the official flags that build that layer)."""
    cfg = heads.config
    kind = {"glu": "star", "mlp": "mlp", "linear": "linear"}[cfg["kind"]]
    if kind == "star" and cfg["activation"] != "relu6":
        raise SailError(f"the official star layer uses ReLU6; these heads use {cfg['activation']} and have no "
                        "official equivalent (train with --activation relu6 to export)")
    if kind == "mlp" and cfg["width"] != OFFICIAL_MLP_WIDTH:
        raise SailError(f"the official mlp layer is {OFFICIAL_MLP_WIDTH}x wide; these heads are {cfg['width']}x "
                        f"(train with --width {OFFICIAL_MLP_WIDTH} to export)")
    if kind == "star" and cfg.get("clamp") not in (None, STAR_CLAMP):
        raise SailError(f"the official star layer clips at +-{STAR_CLAMP:g}; these heads clip at {cfg['clamp']}")
    _, names = LAYOUTS[kind]
    mine = {k: v.detach().cpu().float() for k, v in heads.state_dict().items()}
    out = {"logit_scale": mine["logit_scale"].reshape(1), "logit_bias": mine["logit_bias"].reshape(1)}
    for side, head in SIDES:
        for theirs, ours in names.items():
            out[f"{side}_mapping_network.{theirs}"] = mine[f"{head}.{ours}"].clone()
        out[f"{side}_layer_norm.weight"] = mine[f"{head}.norm.weight"].clone()
        out[f"{side}_layer_norm.bias"] = mine[f"{head}.norm.bias"].clone()
    flags = {"linear_type": kind, "target_dimension": cfg["out_dim"]}
    if kind == "star":
        flags["width_factor"] = cfg["width"]
    return out, flags


def import_official(src: str | Path, out: str | Path, image_model: str | None = None, text_model: str | None = None,
                    overwrite: bool = False) -> dict:
    """Official .pt -> sail run directory (config.json + model.safetensors); returns a summary."""
    from sail.encoders import ALIASES

    _check_dir_out(out, overwrite)
    state, info = load_official(src)
    heads, layout = official_to_heads(state, str(src))
    extra = {"loss": "sigmoid", "converted_from": {
        "file": Path(src).name, "sha256": _sha256(src), "format": "lezhang7/SAIL AlignmentLayer",
        "linear_type": layout["official"], "width_factor": layout["width"], **info}}
    for option, model, modality, dim in (("--image-model", image_model, "image", layout["image_dim"]),
                                         ("--text-model", text_model, "text", layout["text_dim"])):
        if model is None:
            continue
        alias = ALIASES.get(model)
        expected = None if alias is None else alias.hidden * (2 if modality == "image" else 1)
        if alias is not None and (alias.modality != modality or expected != dim):
            raise SailError(f"{option} {model} gives {expected}-d {alias.modality} features but the checkpoint's "
                            f"{modality} tower expects {dim}; name the encoder it was trained on")
        extra[f"{modality}_encoder"] = _encoder_entry(model, modality, dim)
    heads.save_pretrained(out, extra_config=extra)
    return {"out": str(out), "layout": layout, "info": info, "t": float(heads.scale().detach()), "b": float(heads.logit_bias.detach())}


def _encoder_entry(model: str, modality: str, dim: int) -> dict:
    """What a run's config.json says about an encoder: its portable identity, pooling, dim."""
    from sail.encoders import model_identity, resolve_model

    spec = resolve_model(model, modality)
    entry = {"model_id": model_identity(spec), "modality": modality, "dim": dim, "model_revision": "hub:unknown"}
    if Path(spec.source).is_dir():  # a local copy: its identity is its content; the path is a hint for this machine
        from sail.encoders import model_revision

        entry.update(model_revision=model_revision(spec.source), model_path=spec.source)
    if modality == "image":
        entry["pooling"] = "concat"  # official DINOv2 features: [CLS ; mean of patch tokens]
    else:
        entry["max_length"] = OFFICIAL_TEXT_MAX_LENGTH
    return entry


OFFICIAL_TEXT_MAX_LENGTH = 1024  # encode.py / SentenceEmbedding truncate texts at 1024 tokens


def export_official(run: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """sail run -> official trainer-form .pt that AlignmentLayer(...).load_state_dict(strict=True) accepts."""
    heads = AlignmentHeads.from_pretrained(run)
    state, flags = heads_to_official(heads)
    out = Path(out)
    if out.is_dir():
        raise SailError(f"--out {out} is a directory; give a file path such as {out / 'sail_heads.pt'}")
    if out.exists() and not overwrite:
        raise SailError(f"--out {out} already exists; pass --overwrite to replace it, or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"epoch": 0, "name": Path(run).name, "state_dict": state}
    with atomic_path(out) as tmp:  # a crash leaves the old file or none, never half a checkpoint
        torch.save(payload, tmp)
    return {"out": str(out), "flags": flags, "t": float(heads.scale().detach()), "b": float(heads.logit_bias.detach())}


def _check_dir_out(out: str | Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SailError(f"--out {out} is a file; give a directory for the sail run")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SailError(f"--out {out} already exists and is not empty; pass --overwrite or choose another directory")


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def convert(src: str | Path, out: str | Path, to: str | None = None, image_model: str | None = None,
            text_model: str | None = None, overwrite: bool = False) -> dict:
    """`sail convert`: direction from SRC (a .pt file -> sail run; a run directory -> official .pt)."""
    src_path = Path(src)
    to = to or ("official" if src_path.is_dir() else "sail")
    if to not in ("sail", "official"):
        raise SailError(f"--to must be sail or official, not {to!r}")
    if to == "official":
        if not src_path.is_dir():
            raise SailError(f"--to official needs a sail run directory as SRC; {src} is not a directory")
        if image_model or text_model:
            raise SailError("--image-model / --text-model name the encoders of an imported checkpoint; "
                            "the official .pt does not record them")
        return export_official(src_path, out, overwrite)
    if src_path.is_dir():
        raise SailError(f"{src} is a directory; --to sail converts an official .pt file (use --to official "
                        "to export a sail run)")
    return import_official(src_path, out, image_model, text_model, overwrite)
