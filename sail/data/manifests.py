"""Manifests: CSV / TSV / JSONL / Parquet files of ids, image paths and captions, read through Arrow
(the text encoding checked first, so a bad byte is named with its line) into a Dataset.

    ds = open_manifest(Path("data/cc3m.parquet"), columns=["caption", "long_caption"])
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from sail.core.errors import SailError
from sail.data.columns import TextColumn
from sail.data.sources import Dataset, _check_unique, _hash_files

MANIFEST_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")


_ENCODING_BLOCK = 1 << 22  # bytes per step of the encoding check


def _line_of(data: bytes, start: int) -> int:
    return data[:start].count(b"\n") + 1


def check_encoding(path: Path, encoding: str = "utf-8") -> None:
    """Raise SailError naming the first line of `path` that is not valid `encoding` text.

    ASCII-compatible encodings are checked in line-aligned 4 MiB blocks (bounded memory); others
    (UTF-16/32) in one piece.
    """
    import codecs

    try:
        codecs.lookup(encoding)
    except LookupError:
        raise SailError(f"unknown --encoding {encoding!r}; use e.g. utf-8, latin-1, cp1252, utf-16") from None
    hint = "pass the file's encoding with --encoding (e.g. --encoding latin-1), or re-save it as UTF-8"
    ascii_compatible = "\n".encode(encoding, errors="ignore") == b"\n" and "a".encode(encoding, errors="ignore") == b"a"
    with open(path, "rb") as f:
        if not ascii_compatible:
            data = f.read()
            try:
                data.decode(encoding)
            except UnicodeDecodeError as e:
                line = data[:e.start].decode(encoding, errors="replace").count("\n") + 1
                raise SailError(f"{path}:{line} is not {encoding} text ({e.reason} at byte {e.start}); {hint}") from None
            return
        lines_before, carry = 0, b""
        for block in iter(lambda: f.read(_ENCODING_BLOCK), b""):
            block = carry + block
            cut = block.rfind(b"\n") + 1
            block, carry = (block[:cut], block[cut:]) if cut else (b"", block)
            try:
                block.decode(encoding)
            except UnicodeDecodeError as e:
                line = lines_before + _line_of(block, e.start)
                raise SailError(f"{path}:{line} is not {encoding} text ({e.reason}); {hint}") from None
            lines_before += block.count(b"\n")
        try:
            carry.decode(encoding)
        except UnicodeDecodeError as e:
            raise SailError(f"{path}:{lines_before + 1} is not {encoding} text ({e.reason}); {hint}") from None


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A whole text file (JSON inputs), refused in one line naming its first line that is not `encoding`."""
    check_encoding(path, encoding)
    return path.read_text(encoding="utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding)


def _jsonl_problem(path: Path, text: str) -> str | None:
    """Why pyarrow refused a JSONL file, found line by line (only runs on that error path)."""
    types: dict[str, tuple[str, int]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"{path}:{n} is not valid JSON ({e.msg}); fix or remove that line"
        if not isinstance(row, dict):
            return f"{path}:{n} is a JSON {type(row).__name__}, not an object of columns"
        for k, v in row.items():
            if v is None:
                continue
            kind = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}[type(v)]
            first = types.setdefault(k, (kind, n))
            if first[0] != kind:
                return (f"{path}:{n}: column {k!r} holds a {kind} ({json.dumps(v)[:60]}) but a {first[0]} on line "
                        f"{first[1]}; each column needs one type (captions and ids are text)")
    return None


def _read_manifest_table(path: Path, encoding: str = "utf-8", choose=None):
    """(the manifest as a pyarrow Table, its header): typed columns, no per-row Python objects.

    choose(header) -> the columns to keep; Parquet and CSV/TSV then never decode the others.
    """
    import pyarrow as pa

    suffix = path.suffix.lower()
    if suffix not in MANIFEST_EXTENSIONS:
        raise SailError(f"{path}: unknown manifest type {suffix!r}; use one of {', '.join(MANIFEST_EXTENSIONS)}")
    choose = choose or (lambda header: header)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            header = pq.read_schema(path).names
            return pq.read_table(path, columns=_chosen(path, header, choose)), header
        except (pa.ArrowException, OSError) as e:
            raise SailError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    check_encoding(path, encoding)
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head.decode(encoding, errors="ignore").strip("\ufeff \t\r\n"):
        raise SailError(f"{path} is empty; a manifest needs a header (id,image,caption,...) and one row per sample")
    if suffix == ".jsonl":
        import pyarrow.json as pj

        utf8 = encoding.lower().replace("_", "-") in ("utf-8", "utf8")
        source = path if utf8 else io.BytesIO(path.read_bytes().decode(encoding).encode("utf-8"))
        try:
            table = pj.read_json(source)
        except pa.ArrowInvalid as e:
            why = _jsonl_problem(path, path.read_bytes().decode(encoding))
            raise SailError(why or f"{path}: {str(e).splitlines()[0][:200]}") from None
        header = table.column_names
        return table.select(choose(header)), header
    import pyarrow.csv as pcsv

    read = pcsv.ReadOptions(encoding=encoding)
    parse = pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",", newlines_in_values=True)
    try:
        with pcsv.open_csv(path, read_options=read, parse_options=parse) as first:  # only the column names
            header = first.schema.names
        # every column as text: ids like 007 must not become 7
        convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in header}, strings_can_be_null=False,
                                      include_columns=_chosen(path, header, choose))
        return pcsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert), header
    except pa.ArrowInvalid as e:
        raise SailError(f"{path} is not a readable {suffix[1:].upper()} file ({str(e).splitlines()[0][:200]})") from None


def _chosen(path: Path, header: list[str], choose) -> list[str]:
    """choose(header), refusing a chosen column whose name the header repeats (which one would be meant?);
    other repeats, like the empty names of trailing commas, do no harm."""
    chosen = choose(header)
    repeated = [c for c in chosen if header.count(c) > 1]
    if repeated:
        raise SailError(f"{path}: column name(s) {', '.join(map(repr, repeated))} appear more than once in the "
                        "header; rename them so each column has its own name")
    return chosen


def _text_array(col, name: str, path: Path, what: str):
    """A text column (Arrow, chunked) as strings, nulls kept; any other type is refused naming a row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_null(col.type):
        return pa.nulls(len(col), pa.string())
    if pa.types.is_dictionary(col.type) and (pa.types.is_string(col.type.value_type)
                                             or pa.types.is_large_string(col.type.value_type)):
        col = col.cast(col.type.value_type)  # pandas `category` text written to Parquet: the same strings
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        first = pc.index(pc.is_valid(col), True).as_py()
        value = json.dumps(col[first].as_py(), default=str)[:60]
        must = "ids must be text or integers" if what == "id" else f"{what}s must be text"
        raise SailError(f"{path}: {what} column {name!r} holds {col.type} values (row {first + 1}: {value}); {must}")
    return col


def _id_column(col, name: str, path: Path) -> TextColumn:
    """Ids as text (integers allowed); empty or duplicate ids are refused naming a row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(col.type):
        col = pc.cast(col, pa.string())
    else:
        col = _text_array(col, name, path, "id")
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(col), ""), True)
    first = pc.index(empty, True).as_py()
    if first >= 0:
        raise SailError(f"{path}: row {first + 1} has an empty id (column {name!r}); every sample needs a unique id")
    if pc.count_distinct(col).as_py() != len(col):
        _check_unique(col.to_pylist(), path)  # names the first duplicate
    return TextColumn(col)


def _label_column(col) -> tuple[np.ndarray, list[str] | None]:
    """Integer labels stay as they are (missing: -1); text labels become indices into sorted class names."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_integer(col.type):
        return pc.fill_null(col, -1).to_numpy().astype(np.int64), None
    text = pc.cast(col, pa.string())
    if pc.all(pc.match_substring_regex(pc.fill_null(text, "x"), r"^-?[0-9]+$")).as_py():
        return pc.cast(text, pa.int64()).to_numpy().astype(np.int64), None
    names = sorted(v for v in pc.unique(text).to_pylist() if v not in (None, ""))
    index = pc.index_in(text, value_set=pa.array(names, pa.string()))
    return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64), names


class _system_memory_pool:
    """Arrow allocations through malloc while a manifest is read, and what the read freed handed back to
    the OS at the end (glibc's malloc_trim): mimalloc/jemalloc, or glibc's arenas left alone, would keep
    the parser's scratch memory and leave the process holding ~1.5x the columns it kept."""

    def __enter__(self):
        import pyarrow as pa

        self.before = pa.default_memory_pool()
        pa.set_memory_pool(pa.system_memory_pool())

    def __exit__(self, *exc):
        import pyarrow as pa

        pa.set_memory_pool(self.before)
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (macOS, musl): the memory is reused, not returned
            pass


CAPTION_COLUMNS = ("caption", "long_caption", "short_caption", "text")  # read when --columns is not given


def open_manifest(path: Path, columns: list[str] | None, id_column: str = "id",
                  image_column: str = "image", label_column: str = "label", encoding: str = "utf-8") -> Dataset:
    """A CSV/TSV/JSONL/Parquet manifest, one row per sample; rows are numbered from 1 after the header.

    Only the id, image, label and caption columns are read. Ids, image paths and captions stay in the
    Arrow arrays pyarrow read, as `TextColumn`s (a row becomes a Python str when it is read); image
    paths are joined to the manifest's folder, unless absolute, as they are read.
    """
    path = Path(path)
    chosen: dict[str, object] = {}

    def choose(header: list[str]) -> list[str]:
        wanted = [id_column] + list(columns or [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise SailError(f"{path} has no column(s) {', '.join(missing)}; its columns are {', '.join(header)}"
                            " (sail extract chooses them with --columns / --id-column / --image-column)")
        # no image column: a text-only manifest; image extraction then says which column is missing
        chosen["image"] = image_column if image_column in header else ""
        chosen["captions"] = list(columns) if columns is not None else [c for c in CAPTION_COLUMNS if c in header]
        keep = [id_column, chosen["image"], label_column, *chosen["captions"]]
        return [c for c in dict.fromkeys(keep) if c and c in header]

    with _system_memory_pool():
        table, header = _read_manifest_table(path, encoding, choose)
        if table.num_rows == 0:
            raise SailError(f"{path} has a header ({', '.join(header)}) but no rows")
        cols = {c: table.column(c) for c in table.column_names}
        del table
        ids = _id_column(cols[id_column], id_column, path)
        image = chosen["image"]
        if image:
            images = TextColumn(_text_array(cols[image], image, path, "image"), missing=None, folder=str(path.parent))
        else:
            images = TextColumn.nulls(len(ids))
        captions = {c: TextColumn(_text_array(cols[c], c, path, "caption"), missing="") for c in chosen["captions"]}
        labels, class_names = None, None
        if label_column in cols:
            labels, class_names = _label_column(cols[label_column])
        del cols
    return Dataset(path.stem, str(path.resolve()), _hash_files([path], content=True), ids, images,
                   captions, labels, class_names, encoding=encoding)
