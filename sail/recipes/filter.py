"""ALIGN's data filters for an image / alt-text manifest.

ALIGN (seeds/align-slides.txt) trained on raw web alt-texts cleaned only by cheap rules on image
size and text frequency. `filter_align` applies those rules to a manifest and writes the kept rows:

    from sail.recipes.filter import filter_align
    report = filter_align("data/pairs.csv", "data/pairs.filtered.csv",
                          rejects="data/pairs.rejected.csv")  # optional: removed rows + rule
    print(report.table())

Manifests are CSV, TSV (both with a header row, quoted the way Python's csv module and pandas write
them) or JSONL (one JSON object per line), chosen by file extension; `out` may use another format
than the input and keeps the input's columns. Image paths are relative to the manifest's folder.
The input is read as `encoding` (default utf-8; checked first by sail.data.check_encoding, so a wrong
one is one error naming the line), the outputs are written as UTF-8.

Rules, in the order each row is tested. A removed row is counted under the FIRST rule it fails;
a threshold of None turns its rule off.
  1. unreadable_image   the image is missing or not an image (only looked at when rule 2 or 3 is on)
  2. short_side         shorter side <= min_short_side pixels (200)
  3. aspect_ratio       longer side / shorter side >= max_aspect (3.0)
  4. texts_per_image    the image path occurs in more than max_texts_per_image rows (1000)
  5. images_per_text    the alt-text occurs with more than max_images_per_text distinct images (10)
  6. too_few_unigrams   fewer than min_unigrams unigrams (3)
  7. too_many_unigrams  more than max_unigrams unigrams (20)
  8. rare_token         a unigram outside the vocabulary: the vocab_size most frequent unigrams AND
                        bigrams of the manifest, ranked together in one list (100_000; ALIGN used
                        100M on 1.8B pairs). Ties at the cut-off go to the n-gram seen first.

Tokenisation: lower-case, then unigrams are the maximal runs of Unicode letters and digits, so
whitespace, punctuation and "_" all split ("Alt_img, 1920x1080!" -> alt, img, 1920x1080).
Bigrams are adjacent unigram pairs within one text. Two alt-texts are "the same" for rule 5 when
their unigram sequences are equal, so "ALT img" and "alt_img" count as one text.

Counts (rows per image, images per text, n-gram frequencies) cover every row of the manifest,
including rows that an earlier rule removes: they describe the raw corpus, as in ALIGN.

Memory and streaming: the manifest is read twice, row by row, and never held in memory. The first
pass keeps only counters keyed by 16-byte blake2b digests of image paths and texts (so memory grows
with the number of distinct images and texts, not with text length) plus the n-gram counter; the
second pass judges each row and writes kept rows to a temporary file beside `out`, which replaces
`out` only when the run finishes, so an interrupted run leaves no half-written file. Image sizes
come from the file header (PIL opens lazily; pixels are never decoded), and an image shared by
several rows is opened once. Images beyond PIL's decompression-bomb limit count as unreadable.
"""

import csv
import hashlib
import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from sail.core.artifacts import atomic_files
from sail.core.errors import SailError
from sail.data import check_encoding

RULES = (
    "unreadable_image",
    "short_side",
    "aspect_ratio",
    "texts_per_image",
    "images_per_text",
    "too_few_unigrams",
    "too_many_unigrams",
    "rare_token",
)
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
_DIALECTS = {"csv": "excel", "tsv": "excel-tab"}
_UNIGRAM = re.compile(r"[^\W_]+")  # runs of letters/digits: \w without "_"
_EXAMPLES = 3  # ids kept per rule for the report


def tokenize(text: str) -> list[str]:
    """Lower-cased unigrams: maximal runs of Unicode letters and digits."""
    return _UNIGRAM.findall(text.lower())


def _digest(text: str) -> bytes:
    # 16 bytes: collisions are negligible even for billions of keys, and memory stays fixed per key.
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def image_size(path) -> tuple[int, int] | None:
    """(width, height) from the image file's header, or None if missing or unreadable.

    PIL's Image.open parses the header only; `.size` is known without decoding any pixel data.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


@dataclass
class FilterReport:
    """What `filter_align` did: rows seen, kept, and removed per rule (first failing rule)."""

    total: int
    kept: int
    removed: dict[str, int]  # rule -> rows, in test order; only the rules that were on
    examples: dict[str, list[str]] = field(default_factory=dict)  # rule -> first few removed ids

    def table(self) -> str:
        """A small printable table: one line per rule, then kept and total."""
        width = max([len(rule) for rule in self.removed] + [5])
        lines = [f"{'rule':<{width}}  {'rows':>9}  {'share':>6}  first ids"]
        for rule, count in self.removed.items():
            ids = ", ".join(self.examples.get(rule, []))
            lines.append(f"{rule:<{width}}  {count:>9}  {self._share(count)}  {ids}".rstrip())
        lines.append(f"{'kept':<{width}}  {self.kept:>9}  {self._share(self.kept)}")
        lines.append(f"{'total':<{width}}  {self.total:>9}  {self._share(self.total)}")
        return "\n".join(lines)

    def _share(self, count: int) -> str:
        return f"{100.0 * count / self.total:5.1f}%" if self.total else "    - "


# ---------------------------------------------------------------- manifest reading and writing


def _format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise SailError(f"{path}: unknown manifest format {path.suffix!r}; use .csv/.tsv/.jsonl")
    return fmt


def _text_encoding(encoding: str) -> str:
    """The codec to open the manifest with: a UTF-8 byte-order mark is dropped, as pandas/Excel write one."""
    return "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding


def _columns(path: Path, fmt: str, encoding: str = "utf-8") -> list[str]:
    """Column names: the CSV/TSV header, or the keys of the first JSONL record."""
    with open(path, encoding=_text_encoding(encoding), newline="") as f:
        if fmt != "jsonl":
            try:
                header = next(csv.reader(f, dialect=_DIALECTS[fmt]), None)
            except (UnicodeDecodeError, csv.Error) as err:
                raise SailError(f"{path}: cannot parse it ({err}); it must be {encoding} {fmt}") from None
            if not header:
                raise SailError(f"{path}: the manifest is empty; it needs a header row")
            return header
        for number, line in enumerate(f, start=1):
            if line.strip():
                return list(_json_record(line, path, number))
    raise SailError(f"{path}: the manifest is empty; it needs one JSON object per line")


def _json_record(line: str, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        message = f"{path}:{number}: not valid JSON ({err.msg}); fix or drop the line"
        raise SailError(message) from None
    if not isinstance(record, dict):
        raise SailError(f"{path}:{number}: each JSONL line must be a JSON object")
    return record


def _rows(path: Path, fmt: str, needed: list[str], encoding: str = "utf-8"):
    """Yield the manifest's rows as dicts, one at a time (CSV cells missing at a line end -> "")."""
    with open(path, encoding=_text_encoding(encoding), newline="") as f:
        try:
            if fmt != "jsonl":
                for row in csv.DictReader(f, dialect=_DIALECTS[fmt], restval=""):
                    row.pop(None, None)  # cells beyond the header have no column to go to
                    yield row
                return
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                record = _json_record(line, path, number)
                missing = [c for c in needed if c not in record]
                if missing:
                    has = sorted(record)
                    raise SailError(f"{path}:{number}: record lacks {missing}; it has {has}")
                yield record
        except (UnicodeDecodeError, csv.Error) as err:
            raise SailError(f"{path}: cannot parse it ({err}); it must be {encoding} {fmt}") from None


def _row_writer(f, fmt: str, columns: list[str]):
    """A function that writes one row dict to the open file `f` in format `fmt`."""
    if fmt == "jsonl":
        return lambda row: f.write(json.dumps(row, ensure_ascii=False) + "\n")
    writer = csv.DictWriter(f, fieldnames=columns, dialect=_DIALECTS[fmt], extrasaction="ignore")
    writer.writeheader()
    return writer.writerow


def _check_threshold(name: str, value, lowest) -> None:
    if value is not None and not value >= lowest:
        raise SailError(f"{name}={value!r} is out of range; use >= {lowest}, or None for no limit")


# ---------------------------------------------------------------- the filter


@dataclass
class _Rules:
    """The thresholds (None: rule off), the corpus counts of pass 1 and the verdict of each row in pass 2."""
    base: Path
    image_column: str
    text_column: str
    min_short_side: float | None
    max_aspect: float | None
    max_texts_per_image: int | None
    max_images_per_text: int | None
    min_unigrams: int | None
    max_unigrams: int | None
    vocab_size: int | None
    rows_per_image: Counter = field(default_factory=Counter)
    images_of_text: dict = field(default_factory=dict)  # text digest -> an image digest, or a set once there are 2
    vocab: set | None = None
    image_verdicts: dict = field(default_factory=dict)  # image digest -> rule 1-3 verdict, for images in > 1 row

    def image_path(self, row) -> str:
        value = row.get(self.image_column)
        return os.path.normpath(self.base / str(value)) if value not in (None, "") else ""

    def text_of(self, row) -> str:
        value = row.get(self.text_column)
        return "" if value is None else str(value)

    @property
    def checks_images(self) -> bool:
        return self.min_short_side is not None or self.max_aspect is not None

    def on(self) -> dict[str, bool]:
        """Which rules are on (their threshold is not None)."""
        return {"unreadable_image": self.checks_images, "short_side": self.min_short_side is not None,
                "aspect_ratio": self.max_aspect is not None, "texts_per_image": self.max_texts_per_image is not None,
                "images_per_text": self.max_images_per_text is not None,
                "too_few_unigrams": self.min_unigrams is not None, "too_many_unigrams": self.max_unigrams is not None,
                "rare_token": self.vocab_size is not None}

    def count(self, rows) -> int:
        """Pass 1, counters only: an image's set of texts is not needed, only how many rows name it; a text's
        set of images is capped at max_images_per_text + 1, enough to decide rule 5. Returns the rows seen."""
        ngrams: Counter = Counter()
        total = 0
        for row in rows:
            total += 1
            tokens = tokenize(self.text_of(row))
            image_key = _digest(self.image_path(row))
            self.rows_per_image[image_key] += 1
            if self.max_images_per_text is not None:
                text_key = _digest(" ".join(tokens))
                seen = self.images_of_text.get(text_key)
                if seen is None:
                    self.images_of_text[text_key] = image_key
                elif isinstance(seen, bytes):
                    if seen != image_key:
                        self.images_of_text[text_key] = {seen, image_key}
                elif len(seen) <= self.max_images_per_text:
                    seen.add(image_key)
            if self.vocab_size is not None:
                ngrams.update(tokens)  # unigrams first, so a tie at the cut-off favours them
                ngrams.update(f"{a} {b}" for a, b in zip(tokens, tokens[1:]))
        # Only unigrams are ever looked up, but bigrams take their share of the vocab_size places.
        if self.vocab_size:
            self.vocab = {g for g, _ in ngrams.most_common(self.vocab_size) if " " not in g}
        return total

    def image_verdict(self, path: str, image_key: bytes) -> str | None:
        if image_key in self.image_verdicts:
            return self.image_verdicts[image_key]
        size = image_size(path) if path else None
        verdict = None
        if size is None:
            verdict = "unreadable_image"
        elif self.min_short_side is not None and min(size) <= self.min_short_side:
            verdict = "short_side"
        elif self.max_aspect is not None and (min(size) == 0 or max(size) / min(size) >= self.max_aspect):
            verdict = "aspect_ratio"
        if self.rows_per_image[image_key] > 1:
            self.image_verdicts[image_key] = verdict
        return verdict

    def judge(self, row) -> str | None:
        """The first rule that removes `row`, or None to keep it."""
        path = self.image_path(row)
        image_key = _digest(path)
        if self.checks_images and (verdict := self.image_verdict(path, image_key)):
            return verdict
        if self.max_texts_per_image is not None and self.rows_per_image[image_key] > self.max_texts_per_image:
            return "texts_per_image"
        tokens = tokenize(self.text_of(row))
        if self.max_images_per_text is not None:
            seen = self.images_of_text.get(_digest(" ".join(tokens)), b"")
            if (1 if isinstance(seen, bytes) else len(seen)) > self.max_images_per_text:
                return "images_per_text"
        if self.min_unigrams is not None and len(tokens) < self.min_unigrams:
            return "too_few_unigrams"
        if self.max_unigrams is not None and len(tokens) > self.max_unigrams:
            return "too_many_unigrams"
        if self.vocab is not None and any(token not in self.vocab for token in tokens):
            return "rare_token"
        return None


def _check_arguments(manifest: Path, out: Path, rejects: Path | None, thresholds: dict) -> None:
    """Outputs that differ from each other and from the manifest, thresholds in range."""
    outputs = [out] if rejects is None else [out, rejects]
    if rejects is not None:
        _format_of(rejects)
        if rejects.resolve() == out.resolve():
            raise SailError(f"rejects and out are both {out}; give them different paths")
    if not manifest.is_file():
        raise SailError(f"manifest {manifest} does not exist")
    if any(path.resolve() == manifest.resolve() for path in outputs):
        raise SailError(f"an output is the manifest {manifest} itself; write to another path")
    lowest = {"min_short_side": 0, "max_aspect": 1, "max_texts_per_image": 1, "max_images_per_text": 1,
              "min_unigrams": 0, "max_unigrams": 0, "vocab_size": 1}
    for name, value in thresholds.items():
        _check_threshold(name, value, lowest[name])
    low, high = thresholds["min_unigrams"], thresholds["max_unigrams"]
    if low is not None and high is not None and low > high:
        raise SailError(f"min_unigrams={low} > max_unigrams={high}: none can pass")


# ~70 lines: 15 are the signature (one keyword per rule) and its doc; the rest is the two passes in order.
def filter_align(
    manifest,
    out,
    image_column: str = "image",
    text_column: str = "caption",
    id_column: str | None = "id",
    min_short_side: float | None = 200,
    max_aspect: float | None = 3.0,
    max_texts_per_image: int | None = 1000,
    max_images_per_text: int | None = 10,
    min_unigrams: int | None = 3,
    max_unigrams: int | None = 20,
    vocab_size: int | None = 100_000,
    progress: bool = True,
    rejects=None,
    encoding: str = "utf-8",
) -> FilterReport:
    """Apply ALIGN's filters to `manifest` and write the kept rows to `out` (see module docstring).

    `id_column` only labels removed rows in the report (None: the 1-based row number is used).
    `rejects`, if given, is a second output (.csv/.tsv/.jsonl) that receives the removed rows with
    one more column, "filter_rule", naming the rule that removed each. `encoding`: the manifest's text
    encoding (the outputs are UTF-8).
    """
    manifest, out = Path(manifest), Path(out)
    rejects = None if rejects is None else Path(rejects)
    fmt_in, fmt_out = _format_of(manifest), _format_of(out)
    thresholds = dict(min_short_side=min_short_side, max_aspect=max_aspect, max_texts_per_image=max_texts_per_image,
                      max_images_per_text=max_images_per_text, min_unigrams=min_unigrams, max_unigrams=max_unigrams,
                      vocab_size=vocab_size)
    _check_arguments(manifest, out, rejects, thresholds)
    check_encoding(manifest, encoding)  # one line naming the first undecodable line, before any pass
    columns = _columns(manifest, fmt_in, encoding)
    needed = [c for c in (image_column, text_column, id_column) if c is not None]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise SailError(f"{manifest}: no column(s) {missing}; the manifest has columns {columns}")

    rules = _Rules(manifest.parent, image_column, text_column, **thresholds)
    total = rules.count(tqdm(_rows(manifest, fmt_in, needed, encoding), desc="filter: counting", unit="row",
                             disable=not progress))
    removed = {rule: 0 for rule, on in rules.on().items() if on}
    examples: dict[str, list[str]] = {}

    # Pass 2: judge and write (sail.core.artifacts.atomic_files: the outputs appear whole, or not at all)
    outputs = [out] if rejects is None else [out, rejects]
    kept = 0
    with atomic_files(outputs) as files:
        write = _row_writer(files[0], fmt_out, columns)
        if rejects is not None:
            write_reject = _row_writer(files[1], _format_of(rejects), columns + ["filter_rule"])
        rows = tqdm(_rows(manifest, fmt_in, needed, encoding), desc="filter: judging", unit="row",
                    total=total, disable=not progress)
        for number, row in enumerate(rows, start=1):
            rule = rules.judge(row)
            if rule is None:
                write(row)
                kept += 1
                continue
            removed[rule] += 1
            ids = examples.setdefault(rule, [])
            if len(ids) < _EXAMPLES:
                ids.append(str(row[id_column]) if id_column is not None else str(number))
            if rejects is not None:
                write_reject({**row, "filter_rule": rule})
    return FilterReport(total=total, kept=kept, removed=removed, examples=examples)
