"""Datasets that `sail extract` (and the recipes) read: manifests, WebDataset shards, image folders, `sample`.

Every source is opened into one `Dataset`: parallel columns (ids, image references, caption columns,
labels) plus a name and a content hash used to tie a feature store to the data it came from.

    ds = open_dataset("sample")                    # generated on first use, deterministic
    ds = open_dataset("data/cc3m.parquet", columns=["caption", "long_caption"])
    ds = open_dataset("shards/")                   # img2dataset output: 00000.tar, 00001.tar, ...
    ds = open_dataset("imagenet/val/")             # one sub-folder per class
    ds = open_dataset("wds_cars/", split="test")   # CLIP_benchmark webdataset: <root>/test/{0..N-1}.tar
    info = clip_benchmark_info("wds_cars/")        # its dataset type, class names, zero-shot templates
    image = load_image(ds.images[0])               # PIL image; raises ImageError with a short reason
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sail.artifacts import write_json
from sail.columns import TextColumn
from sail.errors import SailError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".parquet")


class ImageError(Exception):
    """An image that cannot be used; the message is the short reason stored with the features."""


@dataclass
class Dataset:
    """Columns of one data source. `images[i]` is a path, a `tar://` reference, or None (text only).

    ids, images and each caption column are sequences: lists, or (manifests) Arrow-backed `TextColumn`s
    that index, slice (-> list), iterate and compare like lists.
    """

    name: str
    source: str
    source_hash: str
    ids: Sequence[str]
    images: Sequence[str | None]
    captions: dict[str, Sequence[str]] = field(default_factory=dict)
    labels: np.ndarray | None = None  # (N,) int64, -1 where unknown
    class_names: list[str] | None = None
    multilabels: np.ndarray | None = None  # (N, C) int8 multi-hot targets (CLIP_benchmark multilabel)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, field, reason) lost while reading
    encoding: str = "utf-8"  # of a text manifest: what reopening `source` needs (a store's "encoding" attribute)

    def __len__(self) -> int:
        return len(self.ids)


# ----------------------------------------------------------------------------------------- images


def tar_reference(shard: str, offset: int, size: int) -> str:
    return f"tar://{shard}::{offset}::{size}"


DEFAULT_MAX_PIXELS = 100_000_000  # larger images are skipped ("too large"), like PIL's bomb guard but named
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on


_PIL_LIFT = {"lock": threading.Lock(), "users": 0, "saved": None}


@contextlib.contextmanager
def _pil_limit_lifted():
    """PIL's MAX_IMAGE_PIXELS off while any load in this process needs it off (threads overlap: counted),
    restored by the last one out."""
    state = _PIL_LIFT
    with state["lock"]:
        if state["users"] == 0:
            state["saved"] = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        state["users"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["users"] -= 1
            if state["users"] == 0:
                Image.MAX_IMAGE_PIXELS = state["saved"]


def load_image(ref: str | os.PathLike | None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               draft: int | None = None) -> Image.Image:
    """Decode one image fully (so truncated files fail here, not later) and return it as RGB.

    Raises ImageError with a short reason for a missing, unreadable or too large (> max_pixels; None
    or 0 = no limit) image. See `to_rgb` for how each PIL mode becomes RGB.
    draft: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (DCT scaling, several times faster) while its
    shorter side stays >= draft pixels.
    """
    if ref is None:
        raise ImageError("no image")
    ref = os.fspath(ref)  # a pathlib.Path works like its string
    try:
        if ref.startswith("tar://"):
            shard, offset, size = ref[len("tar://"):].rsplit("::", 2)
            with open(shard, "rb") as f:
                f.seek(int(offset))
                data = f.read(int(size))
        else:
            if not os.path.exists(ref):
                raise ImageError("missing file")
            with open(ref, "rb") as f:  # read whole: PIL would keep the file open after a failed decode
                data = f.read()
        source = io.BytesIO(data)
        # PIL's own guard (an error above twice its limit) would refuse what the caller allows: lifted while
        # this image decodes, then put back (PIL's limit is process-wide: not ours to change for good)
        lift = Image.MAX_IMAGE_PIXELS and (not max_pixels or max_pixels >= 2 * Image.MAX_IMAGE_PIXELS)
        with _pil_limit_lifted() if lift else contextlib.nullcontext(), warnings.catch_warnings():
            # the pixel limit is ours (below); PIL's DecompressionBombWarning, and its warnings about odd
            # EXIF or TIFF tags, would only break the progress bar: a usable image is used, a bad one fails
            warnings.simplefilter("ignore")
            image = Image.open(source)
            w, h = image.size
            if max_pixels and w * h > max_pixels:
                raise ImageError(f"too large: {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (--max-pixels)")
            if draft and image.format == "JPEG" and min(w, h) >= 2 * draft:
                image.draft("RGB", (-(-w * draft // min(w, h)), -(-h * draft // min(w, h))))  # sides stay >= asked
            image.load()
            return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large: {str(e).splitlines()[0][:160]}") from None
    except Exception as e:  # PIL raises many types for bad files; all mean "unusable image"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"unreadable image: {reason[:200]}") from None


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """Greyscale of any range (16-bit, int32, float) to 0..255 by the image's own finite min..max.

    (H, W) -> (H, W) uint8. A constant image is black (value <= 0) or white; NaN is black, -inf/+inf
    are black/white.
    """
    a = a.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.where(a == np.inf, 255, 0).astype(np.uint8)
    lo, hi = a[finite].min(), a[finite].max()
    if hi > lo:
        out = (a - lo) * 255.0 / (hi - lo)
    else:
        out = np.full(a.shape, 0.0 if lo <= 0 else 255.0)
    out = np.where(a == np.inf, 255.0, np.where(finite, out, 0.0))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _composite(rgba: np.ndarray, background=BACKGROUND) -> np.ndarray:
    """(H, W, 4) uint8 straight alpha -> (H, W, 3) uint8 over `background`: rgb*a + bg*(1-a), rounded."""
    rgb, alpha = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 255.0
    out = rgb * alpha + np.asarray(background, np.float64) * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, background=BACKGROUND) -> Image.Image:
    """Any PIL image as the RGB image a viewer would show.

    EXIF orientation is applied; 16-bit / 32-bit integer and float greyscale (I;16*, I, F) are scaled
    by their real range (`convert("RGB")` would saturate them: white images); transparency (alpha
    channels, palette or single-colour tRNS) is composited on `background`; CMYK uses
    R = (255 - C)(255 - K) / 255 (and likewise G, B) unless an ICC profile says otherwise.
    """
    if image.getexif().get(0x0112, 1) not in (1, None):  # Orientation tag; transposing otherwise only copies
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I;16L, I;16N, I, F
        grey = _scale_to_uint8(np.asarray(image))
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if mode == "CMYK":
        if image.info.get("icc_profile"):
            try:
                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
                return ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except Exception:  # a broken profile: fall back to the plain formula
                pass
        cmyk = np.asarray(image).astype(np.float64)
        rgb = (255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if mode == "La":  # premultiplied grey + alpha: PIL converts it to nothing but LA
        image = image.convert("LA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return Image.fromarray(_composite(np.asarray(image.convert("RGBA")), background), "RGB")
    return image.convert("RGB")  # L, 1, P without transparency, YCbCr, HSV, ...


# ----------------------------------------------------------------------------------------- hashing


def _hash_files(paths: list[Path], content: bool) -> str:
    """Content hash of small files (manifests); name+size hash of large ones (shards, image trees)."""
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        h.update(str(p.name if content else p).encode())
        if content:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- manifests


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


def _check_unique(ids: list[str], where) -> None:
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise SailError(f"{where}: sample id {dup!r} appears more than once; ids must be unique")


# ----------------------------------------------------------------------------------------- shard index


SHARD_INDEX_VERSION = 1
META_EXTENSIONS = (".txt", ".json", ".cls", ".npy")  # small members read into the index (captions, labels)


@dataclass
class ShardIndex:
    """What one tar shard holds, without its image bytes; built once per shard and cached.

    `members` are (name, data offset, size) of every regular file; `meta` holds the decoded content of
    the small metadata members (text for .txt/.json/.cls, a list for .npy, None if unreadable).
    `truncated` is "" for a complete shard, else what is wrong with its end; `usable_bytes` is how
    much of the file the members read so far cover.
    """

    path: str
    size: int
    mtime_ns: int
    members: list[tuple[str, int, int]]
    meta: dict[str, object]
    truncated: str = ""
    usable_bytes: int = 0


def _index_cache_path(path: Path) -> Path:
    from sail.sample import cache_root

    key = hashlib.blake2b(str(path).encode(), digest_size=12).hexdigest()
    return cache_root() / "shard-index" / f"{key}.json"


def shard_index(shard: Path, cache: bool = True) -> ShardIndex:
    """The index of one shard, from the cache when its path, size and mtime are unchanged."""
    path = Path(shard).resolve()
    st = path.stat()
    cached = _index_cache_path(path) if cache else None
    if cached is not None and cached.exists():
        try:
            blob = json.loads(cached.read_text())
            if (blob.get("version") == SHARD_INDEX_VERSION and blob["path"] == str(path)
                    and blob["size"] == st.st_size and blob["mtime_ns"] == st.st_mtime_ns):
                return ShardIndex(blob["path"], blob["size"], blob["mtime_ns"],
                                  [tuple(m) for m in blob["members"]], blob["meta"], blob["truncated"],
                                  blob["usable_bytes"])
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache entry is rebuilt below
    index = _build_shard_index(path, st.st_size, st.st_mtime_ns)
    if cached is not None:
        try:
            write_json(cached, {"version": SHARD_INDEX_VERSION, **asdict(index)}, indent=None)
        except SailError:
            pass  # a read-only (or full) cache only costs re-indexing next time
    return index


def _read_meta(name: str, data: bytes):
    if name.lower().endswith(".npy"):
        try:
            return np.load(io.BytesIO(data), allow_pickle=False).tolist()
        except Exception:  # a damaged .npy is reported against its sample when labels are read
            return None
    return data.decode("utf-8", errors="replace")


def _build_shard_index(path: Path, size: int, mtime_ns: int) -> ShardIndex:
    """Walk the tar headers; a cut anywhere (inside a member, a header or the end blocks) is reported.

    tarfile stops silently at end of file or at a damaged header, so the end is checked here: the
    last member must lie inside the file and be followed by the two zero blocks that end a tar.
    """
    members, meta, truncated, end = [], {}, "", 0
    try:
        with tarfile.open(path, "r:") as tar:
            try:
                for m in tar:
                    if not m.isfile():
                        continue
                    if m.offset_data + m.size > size:
                        truncated = f"it ends inside member {m.name}"
                        break
                    members.append((m.name, m.offset_data, m.size))
                    end = m.offset_data + m.size
                    if os.path.splitext(m.name)[1].lower() in META_EXTENSIONS:
                        meta[m.name] = _read_meta(m.name, tar.extractfile(m).read())
                else:
                    tail_at = tar.offset
                    with open(path, "rb") as f:
                        f.seek(tail_at)
                        tail = f.read(2 * tarfile.BLOCKSIZE)
                    if tail != tarfile.NUL * (2 * tarfile.BLOCKSIZE):
                        truncated = ("it lacks its end-of-archive blocks" if not tail.strip(tarfile.NUL)
                                     else f"its header at byte {tail_at} is damaged or cut")
            except tarfile.ReadError as e:  # tarfile's "unexpected end of data" after a cut member
                truncated = f"it ends early ({e})"
    except tarfile.ReadError as e:  # raised before the first member: empty, cut header, or not a tar
        if size >= tarfile.BLOCKSIZE and "truncated" not in str(e) and "empty" not in str(e):
            raise SailError(f"{path} is not a readable tar shard ({e}); remove it or re-download it") from None
        truncated = f"it ends before its first member ({e})"
    return ShardIndex(str(path), size, mtime_ns, members, meta, truncated, end)


def _group_samples(index: ShardIndex) -> dict[str, dict[str, tuple[str, int, int]]]:
    """webdataset grouping: key = the member path up to the first dot of its file name."""
    samples: dict[str, dict] = {}
    for name, offset, size in index.members:
        folder, base = os.path.split(name)
        key, _, ext = base.partition(".")
        samples.setdefault(os.path.join(folder, key), {})[ext.lower()] = (name, offset, size)
    return samples


def _shard_samples(shards: list[Path], allow_truncated: bool):
    """(shard, index, samples) per shard; truncated shards raise, or lose their last sample when allowed."""
    out, bad, skipped = [], [], []
    for shard in shards:
        index = shard_index(shard)
        samples = _group_samples(index)
        if index.truncated:
            # the last sample seen may have lost members after the cut: it is dropped too
            if samples:
                samples.pop(next(reversed(samples)))
            what = (f"{shard}: {index.truncated}; {len(samples)} samples readable before the cut, "
                    f"{index.usable_bytes:,} of {index.size:,} bytes")
            bad.append(what)
            skipped.append((shard.name, "shard", f"truncated shard: {what}"))
        out.append((shard, index, samples))
    if bad and not allow_truncated:
        more = f" (and {len(bad) - 1} more truncated shard(s))" if len(bad) > 1 else ""
        raise SailError(f"truncated shard {bad[0]}{more}; re-download it (or, with sail extract, pass "
                        "--allow-truncated to record it and skip what is missing)")
    return out, skipped


def _text(index: ShardIndex, member) -> str | None:
    if member is None:
        return None
    value = index.meta.get(member[0])
    return value if isinstance(value, str) else None


# ----------------------------------------------------------------------------------------- webdataset


def open_webdataset(shards: list[Path], columns: list[str] | None, name: str,
                    allow_truncated: bool = False) -> Dataset:
    """img2dataset layout: each sample is key.jpg plus key.txt (caption) and/or key.json."""
    columns = columns or ["caption"]
    ids, images, captions = [], [], {c: [] for c in columns}
    per_shard, skipped = _shard_samples(shards, allow_truncated)
    for shard, index, samples in per_shard:
        for key, s in samples.items():
            meta = {}
            if "json" in s:
                try:
                    meta = json.loads(_text(index, s["json"]) or "{}")
                except json.JSONDecodeError:
                    meta = {}
            if not isinstance(meta, dict):
                meta = {}
            ids.append(str(meta.get("key", key)))
            image = next((s[e] for e in s if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), None)
            images.append(tar_reference(index.path, image[1], image[2]) if image else None)
            for c in columns:
                text = meta.get(c)
                if text is None and c in ("caption", "txt", "text"):
                    text = _text(index, s.get("txt")) or ""
                captions[c].append("" if text is None else str(text).strip())
    _check_unique(ids, shards[0].parent)
    return Dataset(name, str(shards[0].parent.resolve()), _hash_files(shards, content=False), ids, images,
                   captions, skipped=skipped)


# ----------------------------------------------------------------------------------------- CLIP_benchmark

CLIP_BENCHMARK_TYPES = ("classification", "multilabel", "retrieval")
CLIP_BENCHMARK_IMAGES = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order of preference


@dataclass
class ClipBenchmarkInfo:
    """What a CLIP_benchmark webdataset root says about itself (for zero-shot and retrieval defaults).

        info = clip_benchmark_info("wds_cars")        # the root, or one of its split folders
        info.dataset_type                               # "classification" | "multilabel" | "retrieval"
        info.class_names, info.templates                # lists (None when the file is absent)
        info.splits                                     # e.g. ["test", "train"]
    """

    root: Path
    dataset_type: str
    class_names: list[str] | None
    templates: list[str] | None  # each with the placeholder {c}
    splits: list[str]


def _clip_benchmark_root(path: Path) -> Path | None:
    """The root of a CLIP_benchmark layout given its root or one of its split folders; None otherwise."""
    path = Path(path)
    if not path.is_dir():
        return None
    if (path / "nshards.txt").is_file():
        return path.parent
    if any((d / "nshards.txt").is_file() for d in path.iterdir() if d.is_dir()):
        return path
    return None


def is_clip_benchmark(path) -> bool:
    """True for a CLIP_benchmark webdataset root (<root>/<split>/nshards.txt) or one of its split folders."""
    return _clip_benchmark_root(Path(path).expanduser()) is not None


def _read_lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise SailError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None


def clip_benchmark_info(path) -> ClipBenchmarkInfo:
    """Read classnames.txt, zeroshot_classification_templates.txt and dataset_type.txt of a layout."""
    root = _clip_benchmark_root(Path(path).expanduser())
    if root is None:
        raise SailError(f"{path} is not a CLIP_benchmark webdataset folder (no <split>/nshards.txt in it)")
    kind = (_read_lines(root / "dataset_type.txt") or ["classification"])[0].lower()
    if kind not in CLIP_BENCHMARK_TYPES:
        raise SailError(f"{root / 'dataset_type.txt'} says {kind!r}; expected one of {', '.join(CLIP_BENCHMARK_TYPES)}")
    templates = _read_lines(root / "zeroshot_classification_templates.txt")
    for t in templates or []:
        if "{c}" not in t:
            raise SailError(f"{root / 'zeroshot_classification_templates.txt'}: template {t!r} has no {{c}} placeholder")
    splits = sorted(d.name for d in root.iterdir() if (d / "nshards.txt").is_file())
    return ClipBenchmarkInfo(root, kind, _read_lines(root / "classnames.txt"), templates, splits)


def _clip_benchmark_shards(root: Path, split: str, info: ClipBenchmarkInfo) -> list[Path]:
    folder = root / split
    if not (folder / "nshards.txt").is_file():
        raise SailError(f"{root} has no split {split!r} (no {folder / 'nshards.txt'}); its splits are "
                        f"{', '.join(info.splits)}; choose one with --split")
    text = (folder / "nshards.txt").read_text().strip()
    if not text.isdigit() or int(text) == 0:
        raise SailError(f"{folder / 'nshards.txt'} should hold the number of shards, not {text[:40]!r}")
    shards = [folder / f"{k}.tar" for k in range(int(text))]
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise SailError(f"{missing[0]} is missing ({len(missing)} of the {len(shards)} shards nshards.txt names); "
                        "download them again")
    return shards


def open_clip_benchmark(path, split: str = "test", columns: list[str] | None = None,
                        allow_truncated: bool = False) -> Dataset:
    """A CLIP_benchmark webdataset split as a Dataset.

    Classification: `labels` from KEY.cls, `class_names` from classnames.txt. Multilabel: `multilabels`
    (N, C) from KEY.npy. Retrieval: the caption lines of KEY.txt become columns caption_0, caption_1, ...
    ("" where an image has fewer captions). Ids are the sample keys. Giving a split folder selects it.
    """
    path = Path(path).expanduser()
    info = clip_benchmark_info(path)
    root = info.root
    if (path / "nshards.txt").is_file():
        split = path.name
    shards = _clip_benchmark_shards(root, split, info)
    per_shard, skipped = _shard_samples(shards, allow_truncated)
    keys, images, labels, multi, texts = [], [], [], [], []
    for shard, index, samples in per_shard:
        for key, s in samples.items():
            where = f"{shard} sample {key}"
            image = next((s[e] for e in CLIP_BENCHMARK_IMAGES if e in s), None)
            if image is None:
                raise SailError(f"{where} has no image (.webp/.png/.jpg); its members are {', '.join(sorted(s))}")
            keys.append((shard.stem, key))
            images.append(tar_reference(index.path, image[1], image[2]))
            if info.dataset_type == "retrieval":
                text = _text(index, s.get("txt"))
                if text is None:
                    raise SailError(f"{where} has no .txt captions, which a retrieval dataset needs")
                texts.append([t.strip() for t in text.splitlines() if t.strip()])
            elif info.dataset_type == "multilabel":
                value = index.meta.get(s["npy"][0]) if "npy" in s else None
                if not isinstance(value, list) or any(isinstance(v, list) for v in value):
                    raise SailError(f"{where} has no readable .npy label vector, which a multilabel dataset needs")
                multi.append(value)
            else:
                text = (_text(index, s.get("cls")) or "").strip()
                if not text.lstrip("-").isdigit():
                    raise SailError(f"{where} has {'no .cls label' if not text else f'label {text[:20]!r}'}; "
                                    "a classification dataset needs an integer KEY.cls")
                labels.append(int(text))
    ids = [k for _, k in keys]
    if len(set(ids)) != len(ids):  # keys repeat across shards: the shard names them
        ids = [f"{s}/{k}" for s, k in keys]
    _check_unique(ids, root / split)
    ds = Dataset(f"{root.name}-{split}", str((root / split).resolve()),
                 _hash_files(shards, content=False) + _hash_text(info), ids, images, skipped=skipped)
    _attach_targets(ds, info, root / split, columns, texts, multi, labels)
    return ds


def _attach_targets(ds: Dataset, info: ClipBenchmarkInfo, where: Path, columns, texts, multi, labels) -> None:
    """What a CLIP_benchmark split is scored against: caption columns (retrieval), a (N, C) label matrix
    (multilabel) or integer labels (classification), each checked against classnames.txt."""
    ids = ds.ids
    n_classes = len(info.class_names) if info.class_names else None
    if info.dataset_type == "retrieval":
        width = max((len(t) for t in texts), default=0)
        names = [f"caption_{j}" for j in range(width)]
        for c in columns or []:
            if c not in names:
                raise SailError(f"{where} has no caption column {c!r}; its columns are {', '.join(names)}")
        ds.captions = {c: [t[j] if j < len(t) else "" for t in texts]
                       for j, c in enumerate(names) if columns is None or c in columns}
    elif info.dataset_type == "multilabel":
        widths = {len(v) for v in multi}
        if len(widths) > 1 or (n_classes and widths != {n_classes}):
            raise SailError(f"{where}: .npy label vectors have lengths {sorted(widths)}, expected one length "
                            f"{'= ' + str(n_classes) + ' (classnames.txt)' if n_classes else ''}")
        ds.multilabels = np.array(multi, dtype=np.int8).reshape(len(multi), -1)
        ds.class_names = info.class_names
    else:
        ds.labels = np.array(labels, dtype=np.int64)
        ds.class_names = info.class_names
        if n_classes is not None and len(labels) and (ds.labels.min() < 0 or ds.labels.max() >= n_classes):
            bad = int(np.flatnonzero((ds.labels < 0) | (ds.labels >= n_classes))[0])
            raise SailError(f"{where} sample {ids[bad]} has label {labels[bad]}, outside the "
                            f"{n_classes} classes of classnames.txt")


def _hash_text(info: ClipBenchmarkInfo) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps([info.dataset_type, info.class_names, info.templates]).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- image folder


def open_image_folder(root: Path) -> Dataset:
    """ImageNet layout: root/<class>/<image>; the class folder names are the class names."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    ids, images, labels, files = [], [], [], []
    for label, cls in enumerate(classes):
        for p in sorted((root / cls).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                ids.append(str(p.relative_to(root)))
                images.append(str(p.resolve()))
                labels.append(label)
                files.append(p)
    if not ids:
        raise SailError(f"{root} holds no images in class sub-folders; expected {root}/<class>/<image>.jpg")
    return Dataset(root.name, str(root.resolve()), _hash_files(files, content=False), ids, images, {},
                   np.array(labels, dtype=np.int64), classes)


# ----------------------------------------------------------------------------------------- entry point


def open_dataset(spec: str, columns: list[str] | None = None, id_column: str = "id", image_column: str = "image",
                 split: str = "test", allow_truncated: bool = False, encoding: str = "utf-8") -> Dataset:
    """Open `sample`, a manifest file, a tar shard / folder of shards, a CLIP_benchmark webdataset root
    (`split` chooses its split), or a class-per-folder image tree.

    A truncated shard raises SailError unless `allow_truncated`, which keeps its complete samples and
    records the shard in `Dataset.skipped`. `encoding` is the text encoding of CSV/TSV/JSONL manifests.
    """
    if spec in ("sample", "sample-val"):
        from sail.sample import sample_dir

        ds = open_manifest(sample_dir(spec) / "manifest.csv", columns)
        ds.name = spec
        return ds
    path = Path(spec).expanduser()
    if not path.exists():
        raise SailError(f"data {spec!r} not found; give a manifest ({', '.join(MANIFEST_EXTENSIONS)}), "
                        "a folder of .tar shards, a CLIP_benchmark webdataset folder, an image folder, "
                        "or 'sample' / 'sample-val'")
    if path.is_file() and path.suffix.lower() in MANIFEST_EXTENSIONS:
        return open_manifest(path, columns, id_column, image_column, encoding=encoding)
    if path.is_file() and path.suffix == ".tar":
        return open_webdataset([path], columns, path.stem, allow_truncated)
    if path.is_dir():
        if is_clip_benchmark(path):
            return open_clip_benchmark(path, split, columns, allow_truncated)
        shards = sorted(path.glob("*.tar"))
        if shards:
            return open_webdataset(shards, columns, path.name, allow_truncated)
        return open_image_folder(path)
    raise SailError(f"cannot read {spec!r} as data; give a manifest ({', '.join(MANIFEST_EXTENSIONS)}), "
                    "a .tar shard, a folder of shards, a CLIP_benchmark webdataset folder, an image folder, "
                    "or 'sample' / 'sample-val'")
