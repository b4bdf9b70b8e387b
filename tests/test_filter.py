"""Tests for sail/recipes/filter.py: ALIGN's image and alt-text filters on a hand-made manifest."""

import csv
import json
import re
from collections import Counter

import pytest
from PIL import Image, ImageFile

from sail.core.errors import SailError
import sail.recipes.filter as filt
from sail.recipes.filter import FilterReport, filter_align, image_size, tokenize

SIZES = {
    "g1.png": (300, 300), "g2.png": (300, 300), "g3.png": (300, 300), "g4.png": (300, 300),
    "edge.png": (201, 500),      # shorter side 201 > 200, aspect 2.49: kept
    "wide_ok.png": (899, 300),   # aspect 2.997 < 3: kept
    "short.png": (200, 400),     # shorter side 200 <= 200
    "tall.png": (300, 900),      # aspect exactly 3.0 >= 3
    "popular.png": (300, 300),   # named by 5 rows > max_texts_per_image=4
    "h1.png": (300, 300), "h2.png": (300, 300), "h3.png": (300, 300), "h4.png": (300, 300),
}

# (id, image, caption). Thresholds used with it: see THRESHOLDS.
ROWS = [
    ("k1", "img/g1.png", "a red dog runs on the grass"),
    ("k2", "img/g2.png", "A cat sleeps on the mat."),
    ("k3", "img/edge.png", "the red cat sleeps"),
    ("k4", "img/wide_ok.png", "a dog on the mat"),
    ("k5", "img/g1.png", "A red dog runs on the GRASS"),  # same text, same image as k1: 1 image
    ("k6", "img/g3.png", "red_dog, on the mat!"),
    ("s1", "img/short.png", "the red dog"),
    ("a1", "img/tall.png", "the red cat"),
    ("u1", "img/missing.png", "a red cat"),
    ("u2", "img/broken.png", "a cat on the grass"),
    ("p1", "img/popular.png", "the cat on the mat"),
    ("p2", "img/popular.png", "the cat on the mat"),
    ("p3", "img/popular.png", "the cat on the mat"),
    ("p4", "img/popular.png", "dog"),  # also too short, but rule 4 comes first
    ("p5", "img/popular.png", "qwerty red dog"),  # also rare, but rule 4 comes first
    ("t1", "img/h1.png", "sale on the mat today"),
    ("t2", "img/h2.png", "Sale on the mat, today"),
    ("t3", "img/h3.png", "sale_on the MAT today!"),
    ("t4", "img/h4.png", "SALE on the mat today"),
    ("d1", "img/g1.png", "the dog on the grass"),  # 3 distinct images: at the limit, kept
    ("d2", "img/g2.png", "the dog on the grass"),
    ("d3", "img/g3.png", "the dog on the grass"),
    ("f1", "img/g2.png", "red dog"),
    ("f2", "img/g2.png", ""),
    ("m1", "img/g3.png", "a red dog runs on the grass on the mat"),  # 10 unigrams > 8
    ("r1", "img/g4.png", "the red xylophone runs"),
    ("r2", "img/g4.png", "zzyzx red dog"),
    ("k7", "img/g4.png", "the dog today"),  # "today" is frequent only in removed rows t1-t4
]

EXPECTED = {
    "unreadable_image": ["u1", "u2"],
    "short_side": ["s1"],
    "aspect_ratio": ["a1"],
    "texts_per_image": ["p1", "p2", "p3", "p4", "p5"],
    "images_per_text": ["t1", "t2", "t3", "t4"],
    "too_few_unigrams": ["f1", "f2"],
    "too_many_unigrams": ["m1"],
    "rare_token": ["r1", "r2"],
}
KEPT = ["k1", "k2", "k3", "k4", "k5", "k6", "d1", "d2", "d3", "k7"]


def reference_vocab_size(captions):
    """Number of unigrams + bigrams seen at least twice, counted plainly: the top-K cut at K falls
    between count 2 and count 1, so exactly the words seen once are out of the vocabulary."""
    counts = Counter()
    for caption in captions:
        words = [w for w in re.split(r"[\W_]+", caption.lower()) if w]
        counts.update(words)
        counts.update(zip(words, words[1:]))
    return sum(1 for c in counts.values() if c >= 2)


THRESHOLDS = dict(
    max_texts_per_image=4,
    max_images_per_text=3,
    min_unigrams=3,
    max_unigrams=8,
    vocab_size=reference_vocab_size([r[2] for r in ROWS]),
    progress=False,
)


def write_images(folder, sizes=SIZES):
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (120, 60, 30)).save(folder / name)
    (folder / "broken.png").write_text("not an image at all")


def write_manifest(path, rows, columns=("id", "image", "caption", "source")):
    records = [dict(zip(columns, (*row, f"src-{row[0]}"))) for row in rows]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, dialect="excel-tab" if path.suffix == ".tsv" else "excel")
        writer.writeheader()
        writer.writerows(records)


def read_manifest(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, dialect="excel-tab" if path.suffix == ".tsv" else "excel"))


@pytest.fixture
def dataset(tmp_path):
    write_images(tmp_path / "img")
    return tmp_path


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl"])
def test_each_rule_removes_exactly_the_rows_built_for_it(dataset, ext):
    manifest, out = dataset / f"pairs{ext}", dataset / "out" / f"kept{ext}"
    write_manifest(manifest, ROWS)
    report = filter_align(manifest, out, **THRESHOLDS)

    assert report.total == len(ROWS)
    assert report.kept == len(KEPT)
    assert report.removed == {rule: len(ids) for rule, ids in EXPECTED.items()}
    assert list(report.removed) == list(filt.RULES)
    assert report.examples == {rule: ids[:3] for rule, ids in EXPECTED.items()}

    kept_rows = read_manifest(out)
    assert [r["id"] for r in kept_rows] == KEPT
    originals = {row[0]: row for row in ROWS}
    for r in kept_rows:
        assert list(r) == ["id", "image", "caption", "source"]
        assert (r["id"], r["image"], r["caption"]) == originals[r["id"]]
        assert r["source"] == f"src-{r['id']}"
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_rejects_file_names_the_rule_for_every_removed_row(dataset, ext):
    manifest = dataset / f"pairs{ext}"
    write_manifest(manifest, ROWS)
    rejects = dataset / f"rejects{ext}"
    filter_align(manifest, dataset / f"kept{ext}", rejects=rejects, **THRESHOLDS)
    got = {}
    for row in read_manifest(rejects):
        got.setdefault(row["filter_rule"], []).append(row["id"])
        assert list(row) == ["id", "image", "caption", "source", "filter_rule"]
    assert got == EXPECTED


RULE_OF = {
    "min_short_side": "short_side", "max_aspect": "aspect_ratio",
    "max_texts_per_image": "texts_per_image", "max_images_per_text": "images_per_text",
    "min_unigrams": "too_few_unigrams", "max_unigrams": "too_many_unigrams",
    "vocab_size": "rare_token",
}


@pytest.mark.parametrize(
    "turn_off, now_kept, moved",
    [
        (["min_short_side"], ["s1"], {}),
        (["max_aspect"], ["a1"], {}),
        # with both size rules off no image is opened, so unreadable images pass too
        (["min_short_side", "max_aspect"], ["s1", "a1", "u1", "u2"], {}),
        # the popular image's rows then meet the later rules: p4 is too short, p5 has a rare word
        (["max_texts_per_image"], ["p1", "p2", "p3"], {"p4": "too_few_unigrams", "p5": "rare_token"}),
        (["max_images_per_text"], ["t1", "t2", "t3", "t4"], {}),
        (["min_unigrams"], ["f1", "f2"], {}),
        (["max_unigrams"], ["m1"], {}),
        (["vocab_size"], ["r1", "r2"], {}),
    ],
)
def test_disabled_rules(dataset, turn_off, now_kept, moved):
    manifest, out, rejects = dataset / "pairs.jsonl", dataset / "kept.jsonl", dataset / "rej.csv"
    write_manifest(manifest, ROWS)
    report = filter_align(manifest, out, rejects=rejects,
                          **{**THRESHOLDS, **{name: None for name in turn_off}})
    off = {RULE_OF[name] for name in turn_off}
    if {"short_side", "aspect_ratio"} <= off:
        off.add("unreadable_image")
    assert list(report.removed) == [rule for rule in filt.RULES if rule not in off]

    assert [r["id"] for r in read_manifest(out)] == [r[0] for r in ROWS if r[0] in KEPT + now_kept]
    expected = {rule: [i for i in ids if i not in now_kept and i not in moved]
                for rule, ids in EXPECTED.items() if rule not in off}
    for row_id, rule in moved.items():
        expected[rule] = sorted(expected[rule] + [row_id], key=[r[0] for r in ROWS].index)
    got = {rule: [] for rule in report.removed}
    for row in read_manifest(rejects):
        got[row["filter_rule"]].append(row["id"])
    assert got == expected
    assert report.removed == {rule: len(ids) for rule, ids in expected.items()}


def test_cross_format_jsonl_to_csv(dataset):
    manifest, out = dataset / "pairs.jsonl", dataset / "kept.csv"
    write_manifest(manifest, ROWS)
    report = filter_align(manifest, out, **THRESHOLDS)
    rows = read_manifest(out)
    assert [r["id"] for r in rows] == KEPT and report.kept == len(KEPT)
    assert list(rows[0]) == ["id", "image", "caption", "source"]


def test_sizes_come_from_headers_without_decoding(dataset, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    # PNG's loader is ImageFile.load; Image.Image.load is the base. Both must stay untouched.
    monkeypatch.setattr(Image.Image, "load", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    manifest, out = dataset / "pairs.csv", dataset / "kept.csv"
    write_manifest(manifest, ROWS)
    report = filter_align(manifest, out, **THRESHOLDS)
    assert report.removed["short_side"] == 1 and report.removed["aspect_ratio"] == 1
    assert report.kept == len(KEPT)


def test_truncated_png_is_judged_by_its_header(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for name, size in {"big.png": (640, 480), "small.png": (150, 480)}.items():
        noise = Image.effect_noise(size, 64).convert("RGB")  # incompressible, so IDAT is long
        noise.save(img / name)
        data = (img / name).read_bytes()
        (img / name).write_bytes(data[:100])  # signature + IHDR (33 bytes) + a bit of IDAT
        with pytest.raises(OSError):
            with Image.open(img / name) as broken:
                broken.load()
    assert image_size(img / "big.png") == (640, 480)
    assert image_size(img / "small.png") == (150, 480)
    manifest, out = tmp_path / "pairs.csv", tmp_path / "kept.csv"
    write_manifest(manifest, [("big", "img/big.png", "a big photo here"),
                              ("small", "img/small.png", "a small photo here")])
    report = filter_align(manifest, out, progress=False)
    assert [r["id"] for r in read_manifest(out)] == ["big"]
    assert report.removed["short_side"] == 1 and report.removed["unreadable_image"] == 0


def test_each_image_header_is_read_once(dataset, monkeypatch):
    calls = Counter()
    real = filt.image_size

    def counting(path):
        calls[str(path)] += 1
        return real(path)

    monkeypatch.setattr(filt, "image_size", counting)
    manifest = dataset / "pairs.csv"
    write_manifest(manifest, ROWS)
    filter_align(manifest, dataset / "kept.csv", **THRESHOLDS)
    assert len(calls) == len({r[1] for r in ROWS}) and set(calls.values()) == {1}


def test_default_thresholds_at_their_boundaries(tmp_path):
    """1000 rows on one image pass and 1001 do not; a text on 10 images passes and on 11 does not."""
    sizes = {f"x{i}.png": (240, 240) for i in range(21)} | {"a.png": (240, 240), "b.png": (240, 240)}
    write_images(tmp_path / "img", sizes)
    rows = [(f"a{i}", "img/a.png", f"photo of item {i}") for i in range(1000)]
    rows += [(f"b{i}", "img/b.png", f"picture of thing {i}") for i in range(1001)]
    rows += [(f"ten{i}", f"img/x{i}.png", "cheap flights to paris") for i in range(10)]
    rows += [(f"eleven{i}", f"img/x{10 + i}.png", "best hotel deals online") for i in range(11)]
    manifest, out = tmp_path / "pairs.csv", tmp_path / "kept.csv"
    write_manifest(manifest, rows)
    report = filter_align(manifest, out, progress=False)
    kept = [r["id"] for r in read_manifest(out)]
    assert kept == [f"a{i}" for i in range(1000)] + [f"ten{i}" for i in range(10)]
    assert report.removed["texts_per_image"] == 1001
    assert report.removed["images_per_text"] == 11


def test_bigrams_compete_with_unigrams_for_the_vocabulary(tmp_path):
    # counts: aa 6, bb 6, "aa bb" 6, cc 5, "bb cc" 5, dd 1, "bb dd" 1
    rows = [(f"c{i}", "none.png", "aa bb cc") for i in range(5)] + [("d", "none.png", "aa bb dd")]
    manifest = tmp_path / "pairs.csv"
    write_manifest(manifest, rows)
    no_images = dict(min_short_side=None, max_aspect=None, max_images_per_text=None, progress=False)

    def kept(k):
        filter_align(manifest, tmp_path / "kept.csv", vocab_size=k, **no_images)
        return [r["id"] for r in read_manifest(tmp_path / "kept.csv")]

    # top 5 = aa, bb, "aa bb", cc, "bb cc": dd is out although only 4 distinct unigrams exist
    assert kept(5) == ["c0", "c1", "c2", "c3", "c4"]
    # top 6 adds one of the count-1 tie, dd, which was seen before "bb dd"
    assert kept(6) == ["c0", "c1", "c2", "c3", "c4", "d"]
    # top 3 = aa, bb, "aa bb": cc is out too
    assert kept(3) == []


def test_tokenize():
    assert tokenize("Alt_img, 1920x1080!") == ["alt", "img", "1920x1080"]
    assert tokenize("Café—naïve  São-Paulo's") == ["café", "naïve", "são", "paulo", "s"]
    assert tokenize("  ... ") == []


def test_missing_columns_name_the_columns_present(tmp_path):
    manifest = tmp_path / "pairs.csv"
    write_manifest(manifest, [("1", "a.png", "some text here")], columns=("id", "url", "text", "x"))
    with pytest.raises(SailError) as info:
        filter_align(manifest, tmp_path / "out.csv", progress=False)
    message = str(info.value)
    assert "image" in message and "caption" in message and "'url'" in message and "'text'" in message
    # naming the columns fixes it
    report = filter_align(manifest, tmp_path / "out.csv", image_column="url", text_column="text",
                          min_short_side=None, max_aspect=None, progress=False)
    assert report.kept == 1

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"id": 1, "path": "a.png", "caption": "x y z"}) + "\n")
    with pytest.raises(SailError, match="'path'"):
        filter_align(jsonl, tmp_path / "out.jsonl", progress=False)


def test_interrupted_run_leaves_no_file(dataset, monkeypatch):
    manifest, out = dataset / "pairs.csv", dataset / "kept.csv"
    write_manifest(manifest, ROWS)
    out.write_text("previous result\n")
    calls = []

    def dies(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return (300, 300)

    monkeypatch.setattr(filt, "image_size", dies)
    with pytest.raises(KeyboardInterrupt):
        filter_align(manifest, out, **THRESHOLDS)
    assert out.read_text() == "previous result\n"
    assert sorted(p.name for p in dataset.iterdir()) == ["img", "kept.csv", "pairs.csv"]


def test_a_full_disk_while_writing_is_one_line_and_keeps_the_old_outputs(dataset, monkeypatch):
    import errno

    manifest, out, rejects = dataset / "pairs.csv", dataset / "kept.csv", dataset / "rejects.csv"
    write_manifest(manifest, ROWS)
    out.write_text("previous result\n")
    real = filt._row_writer

    def filling(f, fmt, columns):
        write, rows = real(f, fmt, columns), []

        def full(row):
            rows.append(row)
            if len(rows) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            write(row)
        return full

    monkeypatch.setattr(filt, "_row_writer", filling)
    with pytest.raises(SailError, match=r"cannot write .*kept.csv.*\(no space left on the device\)") as e:
        filter_align(manifest, out, rejects=rejects, **THRESHOLDS)
    assert "\n" not in str(e.value)
    assert out.read_text() == "previous result\n" and not rejects.exists()
    assert sorted(p.name for p in dataset.iterdir()) == ["img", "kept.csv", "pairs.csv"]


def test_user_mistakes_raise_sail_error(dataset):
    manifest = dataset / "pairs.csv"
    write_manifest(manifest, ROWS)
    with pytest.raises(SailError, match="format"):
        filter_align(manifest, dataset / "kept.parquet", progress=False)
    with pytest.raises(SailError, match="itself"):
        filter_align(manifest, manifest, progress=False)
    with pytest.raises(SailError, match="does not exist"):
        filter_align(dataset / "nope.csv", dataset / "kept.csv", progress=False)
    with pytest.raises(SailError, match="max_aspect"):
        filter_align(manifest, dataset / "kept.csv", max_aspect=0.5, progress=False)
    with pytest.raises(SailError, match="min_unigrams"):
        filter_align(manifest, dataset / "kept.csv", min_unigrams=5, max_unigrams=4, progress=False)
    bad = dataset / "bad.jsonl"
    bad.write_text('{"id": 1, "image": "a", "caption": "b"}\n{oops\n')
    with pytest.raises(SailError, match="bad.jsonl:2"):
        filter_align(bad, dataset / "kept.jsonl", progress=False)
    empty = dataset / "empty.csv"
    empty.write_text("")
    with pytest.raises(SailError, match="empty"):
        filter_align(empty, dataset / "kept.csv", progress=False)


def test_report_table_and_progress(dataset, capsys):
    manifest = dataset / "pairs.csv"
    write_manifest(manifest, ROWS)
    report = filter_align(manifest, dataset / "kept.csv", **{**THRESHOLDS, "progress": True})
    assert "filter:" in capsys.readouterr().err  # tqdm writes to stderr
    table = report.table()
    lines = table.splitlines()
    assert len(lines) == 1 + len(filt.RULES) + 2
    assert re.search(r"texts_per_image\s+5\s+17\.9%\s+p1, p2, p3", table)
    assert re.search(rf"kept\s+{len(KEPT)}\b", table) and re.search(rf"total\s+{len(ROWS)}\b", table)
    assert FilterReport(total=0, kept=0, removed={}).table().splitlines()[-1].split()[:2] == ["total", "0"]


@pytest.mark.parametrize("ext", [".csv", ".jsonl"])
def test_a_manifest_in_another_encoding(dataset, ext, capsys):
    """latin-1: one error naming the file and line without --encoding; with it, the UTF-8 copy's output."""
    from sail.cli import main

    rows = [(i + ("-café" if i == "k4" else ""), img, text) for i, img, text in ROWS]  # k4: the 4th row, kept
    utf8, latin = dataset / f"u{ext}", dataset / f"l{ext}"
    write_manifest(utf8, rows)
    text = utf8.read_text(encoding="utf-8").replace("\\u00e9", "\u00e9")  # JSONL: the letter, not its escape
    utf8.write_bytes(text.encode("utf-8"))
    latin.write_bytes(text.encode("latin-1"))
    line = 5 if ext == ".csv" else 4  # after the CSV header
    with pytest.raises(SailError, match=rf"l\{ext}:{line} is not utf-8 text .*--encoding"):
        filter_align(latin, dataset / f"out{ext}", **THRESHOLDS)
    assert not (dataset / f"out{ext}").exists()
    want = filter_align(utf8, dataset / f"want{ext}", **THRESHOLDS)
    got = filter_align(latin, dataset / f"out{ext}", encoding="latin-1", **THRESHOLDS)
    assert got == want and (dataset / f"out{ext}").read_bytes() == (dataset / f"want{ext}").read_bytes()  # UTF-8 out
    assert "caf\u00e9" in (dataset / f"out{ext}").read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["filter", "align", str(latin), "--out", str(dataset / f"cli{ext}")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and f"l{ext}:{line} is not utf-8" in err and len(err.splitlines()) == 1
    assert main(["filter", "align", str(latin), "--out", str(dataset / f"cli{ext}"), "--encoding", "latin-1"]) == 0
