"""Data curation on cached features: score filter, semantic dedup, concept balancing -> a file of kept ids.

    sail curate --image features/cc3m/dinov2-l.h5 --text features/cc3m/gte-l.h5 --out cc3m.ids \
        --min-score 0.1 --run runs/cc3m --dedup 0.95 --balance 2000 --per-concept 1000
    sail align --image ... --text ... --subset cc3m.ids --out runs/cc3m-curated

Freeze-align's curated, concept-balanced 6M pairs beat SAIL's 23M; MetaCLIP balances over concepts,
SemDeDup removes semantic near-duplicates. All three need an embedding of every pair, which the feature
stores already hold, so curation here is a few passes over the stores (no encoder runs).

The pairs are the ids both stores hold (valid in the image field and the caption field; the same join
as `sail align`). The stages always run in this order, each on the pairs the previous one kept:

  1. score    (--min-score S, needs --run RUN): keep pairs whose cosine between the run's image and text
              embeddings is >= S (the CLIP-score / ALIGN-style filter, on stores instead of manifests).
  2. dedup    (--dedup T, --dedup-on image|both): remove semantic duplicates. Pairs are visited in priority
              order (the best-scored first when --run is given, else store order); a pair is removed when
              its unit image embedding (with `both`: its image AND its text embedding) has cosine >= T with
              an already kept pair (greedy-by-order: from each group of duplicates exactly the first in
              priority order is kept, and a removed pair never removes others). To scale, the image
              embeddings are clustered first (faiss k-means, --dedup-clusters, default n/1000) and each pair
              is compared only with the pairs of its own (nearest) cluster, blockwise on the device.
              Guarantee: the result equals the O(n^2) greedy rule for every duplicate pair that lands in
              one cluster; a pair split by a cluster boundary is missed (both kept). --dedup-clusters 1 is
              the exact rule. A copy falls on the other side of a boundary only when its original lies
              near that boundary: rare when the embeddings have cluster structure (real ones do), common
              on structureless noise. tests/test_curate.py checks exactness on planted copies in
              clustered data, and --dedup-clusters 1 against an O(n^2) reference on any data.
  3. balance  (--balance K --per-concept N): cluster the text embeddings into K concepts (faiss k-means)
              and keep at most N pairs per concept, a seeded random choice within each, so a few head
              concepts stop drowning the tail (MetaCLIP).

Outputs, written atomically: OUT (kept ids, one per line, in store order), OUT.report.json (counts after
each stage, cluster sizes, removed examples, the settings and seed, each stage's seconds) and OUT.clusters.png (cluster-size
histograms). Every number but the seconds is a function of (stores, run, settings, seed).

Cost model (n pairs, d dims, C dedup clusters, K concepts; benchmarks/curate.py measures it): each stage
streams the stores in --chunk-rows slabs (memory: one slab plus per-pair ints and floats); k-means trains
on <= 32 points per centroid (training: 10 iterations x 32 k^2 d); assignment is n*C*d multiply-adds; dedup compares within clusters,
about n*(n/C)*d; balance assigns n*K*d. Peak memory beyond the slab is the largest cluster's features.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sail.core.errors import SailError
from sail.data.loader import PairedFeatures
from sail.data.store import FeatureStore
from sail.data.subset import read_subset, restrict, subset_digest, subset_sha256, write_ids  # noqa: F401 (re-exported)

TOLERANCE = 1e-6  # cosines are float32: a copy's cosine with itself may read 0.99999994, so --dedup 1 still finds it
DEDUP_ON = ("image", "both")
_EXAMPLES = 5


@dataclass
class CurateConfig:
    image: str
    text: str
    out: str
    caption: str | None = None            # text field (default: the store's first)
    min_score: float | None = None        # stage 1 (needs run)
    run: str | None = None                # an aligned run: scores for stage 1 and the dedup priority
    dedup: float | None = None            # stage 2: cosine threshold T
    dedup_on: str = "image"               # image | both
    dedup_clusters: int | None = None     # None: n // 1000 (at least 1)
    balance: int | None = None            # stage 3: K concepts
    per_concept: int | None = None        # stage 3: N pairs kept per concept at most
    seed: int = 0
    kmeans_iters: int = 10
    chunk_rows: int = 65536
    device: str = "auto"
    progress: bool = True

    def validate(self) -> None:
        if self.dedup is not None and not 0 < self.dedup <= 1:
            raise SailError(f"--dedup {self.dedup} is invalid: a cosine threshold in (0, 1] (0.95 is typical)")
        if self.dedup_on not in DEDUP_ON:
            raise SailError(f"--dedup-on {self.dedup_on} is invalid: use image or both")
        if (self.balance is None) != (self.per_concept is None):
            raise SailError("give --balance K and --per-concept N together (K concepts, at most N pairs each)")
        for flag in ("balance", "per_concept", "dedup_clusters", "chunk_rows", "kmeans_iters"):
            v = getattr(self, flag)
            if v is not None and v < 1:
                raise SailError(f"--{flag.replace('_', '-')} {v} is invalid: must be at least 1")
        if self.min_score is not None and self.run is None:
            raise SailError("--min-score needs --run RUN: the aligned run whose image-text cosine is the score")
        if self.min_score is not None and not -1 <= self.min_score <= 1:
            raise SailError(f"--min-score {self.min_score} is invalid: a cosine in [-1, 1]")
        if self.dedup is None and self.balance is None and self.min_score is None:
            raise SailError("nothing to do: give --dedup T, --balance K --per-concept N, and/or --min-score S --run RUN")
        if self.seed < 0:
            raise SailError(f"--seed {self.seed} is invalid: must be 0 or more")


# ------------------------------------------------------------------------------------------ reading


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _unit(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """float16 rows -> unit float32 rows on `device` (zero rows stay zero)."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(device)
    return torch.nn.functional.normalize(t, dim=1)


def _gather(store: FeatureStore, field: str, rows: np.ndarray) -> np.ndarray:
    """Rows in any order as float16 (len(rows), D): one pread per run of consecutive rows (store.read would read
    every touched HDF5 chunk whole, the whole store for a cluster's scattered rows)."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    out = np.empty((len(uniq), store.dim(field)), dtype=np.float16)
    if len(uniq):
        store.read_sorted_into(field, uniq, out)
    return out[inverse]


def _read_unit(store: FeatureStore, field: str, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    return _unit(_gather(store, field, rows), device)


def _slabs(n: int, step: int):
    return ((lo, min(n, lo + step)) for lo in range(0, n, step))


# ------------------------------------------------------------------------------------------ stage 1: score


def pair_scores(run: str, pairs: PairedFeatures, index: np.ndarray, chunk_rows: int = 65536,
                device: torch.device | str = "cpu", progress: bool = False) -> np.ndarray:
    """Cosine between the run's image and text embeddings of each pair in `index` (float32, (len(index),)).
    The one image-text score of sail: the score filter here and the dedup priority use it."""
    from sail.eval.tasks import check_store_matches_run
    from sail.train.heads import AlignmentHeads
    from sail.train.model import project_store

    check_store_matches_run(run, pairs.image_store, "image")
    check_store_matches_run(run, pairs.text_store, "text")
    heads = AlignmentHeads.from_pretrained(run).to(device)
    out = np.empty(len(index), dtype=np.float32)
    for lo, hi in tqdm(list(_slabs(len(index), chunk_rows)), desc="curate: scoring", disable=not progress):
        sel = index[lo:hi]
        x = project_store(heads, _gather(pairs.image_store, "image", pairs.image_rows[sel]), "image", device=device)
        y = project_store(heads, _gather(pairs.text_store, pairs.captions[0], pairs.text_rows[sel]), "text", device=device)
        out[lo:hi] = (x * y).sum(1).numpy()
    return out


# ------------------------------------------------------------------------------------------ k-means


def kmeans_assign(read, n: int, k: int, seed: int, iters: int, chunk_rows: int, dim: int,
                  progress: bool = False, what: str = "clusters") -> np.ndarray:
    """Spherical faiss k-means over n unit rows, `read(lo, hi)` giving rows [lo, hi) as unit float32 numpy:
    trained on a seeded sample of 32 rows per centroid (at least 4096), then every row assigned in slabs. Returns the
    nearest centroid of each row (int64, (n,)). faiss runs on the GPU when it has one."""
    import faiss

    k = min(k, n)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 1])
    size = min(n, max(32 * k, 4096))  # a floor, so that small concepts of a small k are seen at all
    sample = np.sort(rng.choice(n, size=size, replace=False))
    x = np.concatenate([read(lo, hi)[sample[(sample >= lo) & (sample < hi)] - lo] for lo, hi in _slabs(n, chunk_rows)
                        if ((sample >= lo) & (sample < hi)).any()])
    gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(dim, k, niter=iters, seed=seed, spherical=True, gpu=gpu, max_points_per_centroid=-(-size // k),
                      min_points_per_centroid=1, verbose=False)
    x = np.ascontiguousarray(x, dtype=np.float32)
    km.train(x, init_centroids=_kmeans_pp(x, k, np.random.default_rng([seed, 3])))
    labels = np.empty(n, dtype=np.int64)
    for lo, hi in tqdm(list(_slabs(n, chunk_rows)), desc=f"curate: assigning {what}", disable=not progress):
        _, nearest = km.index.search(np.ascontiguousarray(read(lo, hi), dtype=np.float32), 1)
        labels[lo:hi] = nearest[:, 0]
    return labels


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on unit rows (each next centre drawn with probability ~ its squared distance to the
    nearest chosen one): faiss's uniform seeding often spends two centres on one big concept and merges
    two small ones, which is exactly the tail a balance stage must keep apart. Drawn from <= 4k + 4096 of the
    rows, so the k passes stay in cache (~4 k^2 d multiply-adds)."""
    x = x[np.sort(rng.choice(len(x), size=min(len(x), 4 * k + 4096), replace=False))]
    chosen = [int(rng.integers(len(x)))]
    d2 = np.maximum(2 - 2 * x @ x[chosen[0]], 0)
    for _ in range(1, k):
        total = d2.sum()
        i = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(i)
        d2 = np.minimum(d2, np.maximum(2 - 2 * x @ x[i], 0))
    return x[chosen].copy()


# ------------------------------------------------------------------------------------------ stage 2: dedup


def greedy_dedup(x: torch.Tensor, threshold: float, t: torch.Tensor | None = None,
                 block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The greedy rule on unit rows already in priority order: row i is removed when some earlier KEPT row j
    has cos(x_i, x_j) >= threshold (and, given t, cos(t_i, t_j) >= threshold too). Blockwise: each block of
    rows is compared with the rows kept so far (one matmul), then within itself; only the rows with an
    earlier in-block neighbour are resolved one by one. Returns (keep (m,) bool, duplicate_of (m,) int64:
    the kept row that removed each removed row, -1 for kept ones, cosine (m,) float32 to it)."""
    m = len(x)
    keep = np.ones(m, dtype=bool)
    dup_of = np.full(m, -1, dtype=np.int64)
    cos = np.zeros(m, dtype=np.float32)
    cut = threshold - TOLERANCE
    for lo in range(0, m, block):
        hi = min(m, lo + block)
        kept = np.flatnonzero(keep[:lo])
        if len(kept):
            best, arg = _best_kept(x, t, lo, hi, kept)
            hit = best >= cut
            keep[lo:hi][hit] = False
            dup_of[lo:hi][hit] = kept[arg[hit]]
            cos[lo:hi][hit] = best[hit]
        w = _sim(x[lo:hi], x[lo:hi], t[lo:hi] if t is not None else None, t[lo:hi] if t is not None else None)
        w = (torch.tril(w, diagonal=-1) >= cut).cpu().numpy()  # (b, b): earlier in-block neighbours
        alive = keep[lo:hi]  # a view: updating it updates keep
        w[:, ~alive] = False
        for i in np.flatnonzero(w.any(1) & alive):
            js = np.flatnonzero(w[i, :i] & alive[:i])
            if len(js):
                alive[i] = False
                dup_of[lo + i] = lo + js[0]
                cos[lo + i] = float(_sim(x[lo + i:lo + i + 1], x[lo + js[0]:lo + js[0] + 1],
                                         None if t is None else t[lo + i:lo + i + 1],
                                         None if t is None else t[lo + js[0]:lo + js[0] + 1]))
    return keep, dup_of, cos


def _best_kept(x: torch.Tensor, t: torch.Tensor | None, lo: int, hi: int, kept: np.ndarray,
               cols: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """For rows [lo, hi): the highest similarity to any kept row and which (position in `kept`), over kept
    rows `cols` at a time, so a big cluster never needs a (block, all kept) matrix."""
    best = torch.full((hi - lo,), -2.0, device=x.device)
    arg = torch.zeros(hi - lo, dtype=torch.long, device=x.device)
    for c in range(0, len(kept), cols):
        sel = torch.from_numpy(kept[c:c + cols]).to(x.device)
        s = _sim(x[lo:hi], x[sel], None if t is None else t[lo:hi], None if t is None else t[sel])  # (b, cols)
        value, where = s.max(dim=1)
        better = value > best
        best, arg = torch.where(better, value, best), torch.where(better, where + c, arg)
    return best.cpu().numpy(), arg.cpu().numpy()


def _sim(a: torch.Tensor, b: torch.Tensor, ta: torch.Tensor | None, tb: torch.Tensor | None) -> torch.Tensor:
    """(len(a), len(b)) cosines of unit rows; with texts, the smaller of the image and text cosine (a pair is a
    duplicate on `both` when both reach the threshold)."""
    s = a @ b.T
    return s if ta is None else torch.minimum(s, ta @ tb.T)


def _dedup(pairs: PairedFeatures, index: np.ndarray, priority: np.ndarray | None, cfg: CurateConfig,
           device: torch.device) -> tuple[np.ndarray, dict]:
    """Stage 2 on the pairs `index` (sorted): the kept subset of `index` and the stage's report."""
    n = len(index)
    k = cfg.dedup_clusters or max(1, n // 1000)

    def read(lo, hi):
        return _read_unit(pairs.image_store, "image", pairs.image_rows[index[lo:hi]], device).cpu().numpy()

    labels = kmeans_assign(read, n, k, cfg.seed, cfg.kmeans_iters, cfg.chunk_rows, pairs.image_store.dim("image"),
                           cfg.progress, "dedup clusters")
    keep = np.ones(n, dtype=bool)
    examples = []
    # priority order inside each cluster: best score first (stable: ties keep store order)
    order = np.argsort(-priority, kind="stable") if priority is not None else np.arange(n)
    by_cluster = order[np.argsort(labels[order], kind="stable")]
    bounds = np.searchsorted(labels[by_cluster], np.arange(k + 1))
    for c in tqdm(range(k), desc="curate: dedup", disable=not cfg.progress):
        members = by_cluster[bounds[c]:bounds[c + 1]]
        if len(members) < 2:
            continue
        x = _read_unit(pairs.image_store, "image", pairs.image_rows[index[members]], device)
        t = _read_unit(pairs.text_store, pairs.captions[0], pairs.text_rows[index[members]], device) \
            if cfg.dedup_on == "both" else None
        ok, dup_of, cos = greedy_dedup(x, cfg.dedup, t)
        keep[members[~ok]] = False
        for i in np.flatnonzero(~ok)[:max(0, _EXAMPLES - len(examples))]:
            examples.append({"removed": str(pairs.ids[index[members[i]]]),
                             "duplicate_of": str(pairs.ids[index[members[dup_of[i]]]]), "cosine": round(float(cos[i]), 4)})
    sizes = np.bincount(labels, minlength=k)
    return index[keep], {"stage": "dedup", "threshold": cfg.dedup, "on": cfg.dedup_on, "clusters": int(k),
                         "removed": int((~keep).sum()), "kept": int(keep.sum()), "examples": examples,
                         "cluster_sizes": sizes.tolist()}


# ------------------------------------------------------------------------------------------ stage 3: balance


def cap_per_concept(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Positions to keep: every position of a concept with <= cap members, else a seeded random `cap` of them
    (the generator is seeded by (seed, concept), so one concept's choice does not depend on the others)."""
    by_concept = np.argsort(labels, kind="stable")
    concepts, starts = np.unique(labels[by_concept], return_index=True)
    keep = []
    for c, members in zip(concepts, np.split(by_concept, starts[1:])):
        if len(members) > cap:
            members = np.random.default_rng([seed, 2, int(c)]).choice(members, size=cap, replace=False)
        keep.append(members)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _balance(pairs: PairedFeatures, index: np.ndarray, cfg: CurateConfig, device: torch.device) -> tuple[np.ndarray, dict]:
    n, field_ = len(index), pairs.captions[0]

    def read(lo, hi):
        return _read_unit(pairs.text_store, field_, pairs.text_rows[index[lo:hi]], device).cpu().numpy()

    labels = kmeans_assign(read, n, cfg.balance, cfg.seed, cfg.kmeans_iters, cfg.chunk_rows,
                           pairs.text_store.dim(field_), cfg.progress, "concepts")
    pos = cap_per_concept(labels, cfg.per_concept, cfg.seed)
    k = min(cfg.balance, n)
    before, after = np.bincount(labels, minlength=k), np.bincount(labels[pos], minlength=k)
    dropped = np.setdiff1d(np.arange(n), pos)
    examples = [{"removed": str(pairs.ids[index[i]]), "concept": int(labels[i]), "concept_size": int(before[labels[i]])}
                for i in dropped[np.argsort(-before[labels[dropped]], kind="stable")][:_EXAMPLES]]
    return index[pos], {"stage": "balance", "concepts": int(k), "per_concept": cfg.per_concept,
                        "removed": int(n - len(pos)), "kept": int(len(pos)), "examples": examples,
                        "concept_sizes_before": before.tolist(), "concept_sizes_after": after.tolist()}


# ------------------------------------------------------------------------------------------ the command


@dataclass
class CurateReport:
    pairs: int
    kept: int
    stages: list[dict] = field(default_factory=list)
    outputs: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'stage':<8} {'kept':>10} {'removed':>10}", f"{'joined':<8} {self.pairs:>10} {'':>10}"]
        for s in self.stages:
            lines.append(f"{s['stage']:<8} {s['kept']:>10} {s['removed']:>10}")
        for s in self.stages:
            for e in s.get("examples", [])[:3]:
                lines.append(f"  {s['stage']} removed: " + ", ".join(f"{k}={v}" for k, v in e.items() if k != "removed")
                             + f"  ({e['removed']})")
        lines += [f"wrote {p}" for p in self.outputs.values()]
        return "\n".join(lines)


def _paths(out: str) -> dict:
    p = Path(out)
    return {"ids": str(p), "report": str(p.with_name(p.name + ".report.json")),
            "picture": str(p.with_name(p.name + ".clusters.png"))}


def curate(cfg: CurateConfig) -> CurateReport:
    """Run the stages of the module doc on the stores in `cfg` and write OUT, OUT.report.json, OUT.clusters.png."""
    cfg.validate()
    device = _device(cfg.device)
    image, text = FeatureStore(cfg.image), FeatureStore(cfg.text)
    caption = cfg.caption or text.fields[0]
    pairs = PairedFeatures.from_stores(image, text, [caption])
    bad = [i for i in pairs.ids if "\n" in i or "\r" in i]
    if bad:
        raise SailError(f"id {bad[0]!r} holds a line break and cannot go into an ids file (one id per line)")
    index = np.arange(len(pairs))
    report = CurateReport(pairs=len(pairs), kept=len(pairs))
    scores = None
    clock = time.perf_counter()
    if cfg.run is not None:
        scores = pair_scores(cfg.run, pairs, index, cfg.chunk_rows, device, cfg.progress)
    if cfg.min_score is not None:
        ok = scores >= cfg.min_score
        low = np.flatnonzero(~ok)[np.argsort(scores[~ok], kind="stable")][:_EXAMPLES]
        report.stages.append({"stage": "score", "min_score": cfg.min_score, "removed": int((~ok).sum()), "kept": int(ok.sum()),
                              "examples": [{"removed": str(pairs.ids[i]), "score": round(float(scores[i]), 4)} for i in low]})
        index = index[ok]
        clock = _timed(report, clock)
    if cfg.dedup is not None and len(index):
        index, stage = _dedup(pairs, index, None if scores is None else scores[index], cfg, device)
        report.stages.append(stage)
        clock = _timed(report, clock)
    if cfg.balance is not None and len(index):
        index, stage = _balance(pairs, index, cfg, device)
        report.stages.append(stage)
        clock = _timed(report, clock)
    report.kept = len(index)
    _write(cfg, pairs.ids[index], report)
    return report


def _timed(report: CurateReport, since: float) -> float:
    """Record the last stage's wall seconds (the one number of the report that is not reproducible)."""
    now = time.perf_counter()
    report.stages[-1]["seconds"] = round(now - since, 3)
    return now


def _write(cfg: CurateConfig, ids: np.ndarray, report: CurateReport) -> None:
    from sail.core.artifacts import write_atomic, write_json

    paths = _paths(cfg.out)
    write_ids(paths["ids"], ids)
    report.outputs = paths
    write_json(paths["report"], {"pairs": report.pairs, "kept": report.kept, "ids_sha256": subset_digest(ids),
                                 "stages": report.stages, "settings": asdict(cfg)})
    write_atomic(paths["picture"], _histograms(report.stages))


def _histograms(stages: list[dict]) -> bytes:
    """PNG: one histogram of cluster sizes per clustering stage (balance: before and after the cap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"dedup: {s['clusters']} image clusters", [s["cluster_sizes"]], ["pairs"]) for s in stages if s["stage"] == "dedup"]
    panels += [(f"balance: {s['concepts']} text concepts, cap {s['per_concept']}",
                [s["concept_sizes_before"], s["concept_sizes_after"]], ["before", "after"])
               for s in stages if s["stage"] == "balance"]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.5), squeeze=False)
    for ax, (title, series, labels) in zip(axes[0], panels):
        for sizes, label in zip(series, labels):
            ax.hist(sizes, bins=min(50, max(5, len(sizes))), alpha=0.6, label=label)
        ax.set(title=title, xlabel="pairs per cluster", ylabel="clusters")
        ax.ticklabel_format(useOffset=False, style="plain")
        ax.legend()
    if not panels:
        axes[0][0].text(0.5, 0.5, "no clustering stage ran", ha="center")
        axes[0][0].axis("off")
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["CurateConfig", "CurateReport", "curate", "greedy_dedup", "cap_per_concept", "kmeans_assign", "pair_scores",
           "read_subset", "restrict", "subset_digest", "subset_sha256", "write_ids"]
