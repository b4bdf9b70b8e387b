"""sail curate: dedup against a brute-force greedy reference, concept caps, score filter, ids files, --subset."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from sail.cli import main
from sail.train.align_heads import AlignConfig, align
from sail.curate import (CurateConfig, cap_per_concept, curate, greedy_dedup, read_subset, restrict, subset_digest,
                         write_ids)
from sail.core.errors import SailError
from sail.data.loader import PairedFeatures
from sail.data.store import FeatureStore
from tests.synthetic import paired_stores, write_store


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _reference(x, t, threshold):
    """The greedy rule, O(n^2), row by row: row i goes when an earlier kept row is within the threshold."""
    sim = x @ x.T if t is None else np.minimum(x @ x.T, t @ t.T)
    kept = []
    for i in range(len(x)):
        if not any(sim[i, j] >= threshold - 1e-6 for j in kept):
            kept.append(i)
    keep = np.zeros(len(x), dtype=bool)
    keep[kept] = True
    return keep


def _planted(rng, n_base, n_copies, dim, noise):
    """n_base random rows, then n_copies copies of random base rows (exact when noise is 0), shuffled."""
    base = rng.standard_normal((n_base, dim))
    src = rng.integers(0, n_base, n_copies)
    x = np.concatenate([base, base[src] + noise * rng.standard_normal((n_copies, dim))])
    return _unit(x[rng.permutation(len(x))])


@pytest.mark.parametrize("seed", range(12))
def test_greedy_dedup_equals_the_brute_force_rule_over_sizes_thresholds_and_blocks(seed):
    rng = np.random.default_rng(seed)
    for _ in range(6):
        n_base, n_copies, dim = int(rng.integers(1, 40)), int(rng.integers(0, 40)), int(rng.integers(2, 12))
        noise = float(rng.choice([0.0, 0.01, 0.1, 0.5]))
        threshold = float(rng.choice([0.3, 0.7, 0.9, 0.99, 1.0]))
        x = _planted(rng, n_base, n_copies, dim, noise)
        t = _planted(rng, n_base, n_copies, dim, noise) if rng.random() < 0.5 else None
        block = int(rng.integers(1, 20))
        keep, dup_of, cos = greedy_dedup(torch.from_numpy(x), threshold, None if t is None else torch.from_numpy(t), block)
        assert (keep == _reference(x, t, threshold)).all()
        removed = np.flatnonzero(~keep)
        assert keep[dup_of[removed]].all() and (dup_of[removed] < removed).all()  # removed by an earlier kept row
        assert (dup_of[keep] == -1).all() and (cos[removed] >= threshold - 1e-6).all()


def test_exact_copies_keep_exactly_one_row_of_each_group():
    rng = np.random.default_rng(0)
    base = _unit(rng.standard_normal((50, 16)))
    copies = rng.integers(1, 5, 50)  # row i appears copies[i] times
    x = np.repeat(base, copies, axis=0)
    keep, _, _ = greedy_dedup(torch.from_numpy(x), 1.0, block=7)
    assert keep.sum() == 50
    assert (np.flatnonzero(keep) == np.concatenate([[0], np.cumsum(copies)[:-1]])).all()  # the first of each group


def _skewed_stores(tmp, rng, n_base=300, copies=150, noise=0.02, dim=24, concepts=None):
    """Image/text stores of n_base random pairs plus `copies` near copies of random base pairs (both views)."""
    base_i, base_t = rng.standard_normal((n_base, dim)), rng.standard_normal((n_base, dim))
    if concepts is not None:  # rows around a few far-apart concept centres (tight in text, looser in image)
        lab = np.repeat(np.arange(len(concepts)), concepts)
        base_t = 10 * rng.standard_normal((len(concepts), dim))[lab] + 0.3 * rng.standard_normal((len(lab), dim))
        base_i = 3 * rng.standard_normal((len(concepts), dim))[lab] + rng.standard_normal((len(lab), dim))
        n_base = len(lab)
    src = rng.integers(0, n_base, copies)
    image = np.concatenate([base_i, base_i[src] + noise * rng.standard_normal((copies, dim))])
    text = np.concatenate([base_t, base_t[src] + noise * rng.standard_normal((copies, dim))])
    order = rng.permutation(len(image))
    ids = np.array([f"p{i:05d}" for i in range(len(image))])
    img = write_store(tmp / "img.h5", ids, {"image": image[order].astype(np.float16)}, "image", "synthetic-vision")
    txt = write_store(tmp / "txt.h5", ids[::-1], {"caption": text[order][::-1].astype(np.float16)}, "text", "synthetic-text")
    return img, txt, order  # id p{k} holds planted row order[k]


def _stored_unit(path, field):
    s = FeatureStore(path)
    return s.ids, _unit(s.read(field).astype(np.float32))


@pytest.mark.parametrize("on", ["image", "both"])
@pytest.mark.parametrize("threshold", [0.9, 0.99])
@pytest.mark.parametrize("clusters", [1, 5])
def test_curate_dedup_equals_the_reference_on_planted_duplicates(tmp_path, on, threshold, clusters):
    """1 cluster: the exact rule on any data. 5 clusters over 5 separated concepts: every duplicate pair lands
    in one cluster, so the clustered result is still the exact one (the guarantee of sail.curate)."""
    img, txt, _ = _skewed_stores(tmp_path, np.random.default_rng(1), concepts=[120, 80, 50, 30, 20])
    report = curate(CurateConfig(image=str(img), text=str(txt), out=str(tmp_path / "kept.ids"), dedup=threshold,
                                 dedup_on=on, dedup_clusters=clusters, progress=False))
    image_ids, x = _stored_unit(img, "image")
    text_ids, t = _stored_unit(txt, "caption")
    t = t[FeatureStore(txt).row_of(image_ids)]  # texts in image-store order (the pairs' order)
    expect = image_ids[_reference(x, t if on == "both" else None, threshold)]
    kept = read_subset(tmp_path / "kept.ids")
    assert kept == list(expect)
    assert report.kept == len(expect) and report.pairs == 450 and len(expect) <= 300 + 1
    saved = json.loads((tmp_path / "kept.ids.report.json").read_text())
    assert saved["stages"][0]["removed"] == 450 - len(expect) and saved["ids_sha256"] == subset_digest(expect)
    assert (tmp_path / "kept.ids.clusters.png").read_bytes()[:4] == b"\x89PNG"


def test_balance_caps_every_concept_and_is_deterministic(tmp_path):
    sizes = [400, 150, 40, 10, 5]
    img, txt, order = _skewed_stores(tmp_path, np.random.default_rng(2), copies=0, concepts=sizes)
    cfg = dict(image=str(img), text=str(txt), balance=5, per_concept=30, progress=False)
    curate(CurateConfig(out=str(tmp_path / "a.ids"), **cfg))
    curate(CurateConfig(out=str(tmp_path / "b.ids"), **cfg))
    curate(CurateConfig(out=str(tmp_path / "c.ids"), seed=1, **cfg))
    a, b, c = (read_subset(tmp_path / f"{k}.ids") for k in "abc")
    assert a == b and a != c

    def numbers(k):  # the report but its timings and its own file name
        r = json.loads((tmp_path / f"{k}.ids.report.json").read_text())
        r["settings"].pop("out")
        return [{k2: v for k2, v in st.items() if k2 != "seconds"} for st in r["stages"]], r["settings"], r["ids_sha256"]

    assert numbers("a") == numbers("b")
    planted = np.repeat(np.arange(5), sizes)  # the concept of each planted row
    got = np.bincount([planted[order[int(i[1:])]] for i in a], minlength=5)
    assert got.tolist() == [30, 30, 30, 10, 5]
    report = json.loads((tmp_path / "a.ids.report.json").read_text())["stages"][0]
    assert sorted(report["concept_sizes_before"]) == sorted(sizes) and max(report["concept_sizes_after"]) == 30


def test_cap_per_concept_keeps_small_concepts_whole_and_samples_big_ones():
    rng = np.random.default_rng(0)
    for _ in range(50):
        labels = rng.integers(0, int(rng.integers(1, 8)), int(rng.integers(1, 200)))
        cap = int(rng.integers(1, 40))
        pos = cap_per_concept(labels, cap, seed=3)
        assert (np.diff(pos) > 0).all()
        counts, kept = np.bincount(labels, minlength=8), np.bincount(labels[pos], minlength=8)
        assert (kept == np.minimum(counts, cap)).all()
        assert (cap_per_concept(labels, cap, seed=3) == pos).all()


def _tiny_run(tmp_path, img, txt, **kw):
    base = dict(image=str(img), text=str(txt), out=str(tmp_path / "run"), head="linear", out_dim=16, batch=128,
                steps=30, lr=3e-3, optimizer="adamw", weight_decay=0.0, val_fraction=0.1, eval_every=1000,
                checkpoint_every=10, progress=False, log_every=10)
    cfg = AlignConfig(**{**base, **kw})
    return cfg, align(cfg)


def test_min_score_keeps_exactly_the_pairs_scored_at_least_s(tmp_path):
    img, txt = paired_stores(tmp_path, n=600, noise=0.5)
    _tiny_run(tmp_path, img, txt)
    from sail.train.heads import AlignmentHeads

    heads = AlignmentHeads.from_pretrained(tmp_path / "run")
    istore, tstore = FeatureStore(img), FeatureStore(txt)
    with torch.no_grad():  # by hand: both heads on the stored rows, cosine of each pair
        x = heads.encode_image(torch.from_numpy(istore.read("image")).float())
        y = heads.encode_text(torch.from_numpy(tstore.read("caption", tstore.row_of(istore.ids))).float())
    score = (x * y).sum(1).numpy()
    s = float(np.median(score))
    report = curate(CurateConfig(image=str(img), text=str(txt), out=str(tmp_path / "s.ids"), min_score=s,
                                 run=str(tmp_path / "run"), progress=False))
    assert read_subset(tmp_path / "s.ids") == list(istore.ids[score >= s])
    assert report.stages[0]["kept"] == int((score >= s).sum())


def test_ids_file_round_trip_and_restrict(tmp_path):
    img, txt = paired_stores(tmp_path, n=50)
    pairs = PairedFeatures.from_stores(FeatureStore(img), FeatureStore(txt), ["caption"])
    pick = list(pairs.ids[[3, 1, 40, 7]])
    odd = ["id with space", " lead", "é ü", "tab\there"]
    write_ids(tmp_path / "odd.ids", odd)
    assert read_subset(tmp_path / "odd.ids") == odd
    (tmp_path / "win.ids").write_bytes(b"a\r\nb\r\n\r\n")  # written on Windows, a blank line at the end
    assert read_subset(tmp_path / "win.ids") == ["a", "b"]
    write_ids(tmp_path / "x.ids", pick)
    assert read_subset(tmp_path / "x.ids") == pick
    sub = restrict(pairs, tmp_path / "x.ids")
    assert sorted(sub.ids) == sorted(pick) and len(sub) == 4
    assert subset_digest(pick) == subset_digest(reversed(pick))
    write_ids(tmp_path / "bad.ids", pick + ["nope"])
    with pytest.raises(SailError, match=r"1 of its 5 ids are not among the valid pairs.*'nope'"):
        restrict(pairs, tmp_path / "bad.ids")


def test_cli_refuses_a_subset_with_unknown_ids_in_one_line(tmp_path, capsys):
    img, txt = paired_stores(tmp_path, n=100)
    write_ids(tmp_path / "bad.ids", ["id00001", "ghost"])
    rc = main(["align", "--image", str(img), "--text", str(txt), "--out", str(tmp_path / "r"), "--subset",
               str(tmp_path / "bad.ids"), "--batch", "2", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --subset") and "'ghost'" in err and len(err.strip().splitlines()) == 1


def test_align_trains_on_the_subset_and_resume_refuses_a_changed_one(tmp_path):
    img, txt = paired_stores(tmp_path, n=600)
    ids = list(FeatureStore(img).ids)
    write_ids(tmp_path / "keep.ids", ids[::2])
    cfg, result = _tiny_run(tmp_path, img, txt, subset=str(tmp_path / "keep.ids"), steps=20)
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["subset_sha256"] == subset_digest(ids[::2])
    summary = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["train"]["pairs"] + summary["train"]["val_pairs"] == 300
    write_ids(tmp_path / "keep.ids", ids[1::2])
    with pytest.raises(SailError, match="subset-sha256"):
        align(cfg, resume=True)
    write_ids(tmp_path / "keep.ids", ids[::2][::-1])  # the same set in another order is the same subset
    assert align(cfg, resume=True).steps == 20
    streamed = dataclasses.replace(cfg, out=str(tmp_path / "streamed"), in_memory="no")
    align(streamed)
    record = json.loads((tmp_path / "streamed" / "config.json").read_text())["train"]
    assert record["pairs"] + record["val_pairs"] == 300
    assert json.loads((tmp_path / "streamed" / "train_config.json").read_text())["batching"]["mode"] == "stream"


def test_curate_refuses_bad_settings_in_one_line(tmp_path, capsys):
    img, txt = paired_stores(tmp_path, n=20)
    base = ["curate", "--image", str(img), "--text", str(txt), "--out", str(tmp_path / "k.ids")]
    for extra, needle in ((["--dedup", "1.5"], "--dedup 1.5 is invalid"), (["--balance", "3"], "--per-concept"),
                          (["--min-score", "0.2"], "needs --run"), ([], "nothing to do"),
                          (["--dedup", "0.9", "--dedup-on", "text"], "--dedup-on text")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "k.ids").write_text("x\n")
    assert main(base + ["--dedup", "0.9"]) == 2 and "--overwrite" in capsys.readouterr().err
