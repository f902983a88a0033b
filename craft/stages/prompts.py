"""Load the original prompts CRAFT aligns on, from the built-in sets or from a user's file.

Every stage downstream keys its work on the prompt text (groups, rewards scored against the
original prompt, the held-out split), so this module is where prompt text is made trustworthy:
whitespace normalised, empty and over-long entries dropped, case-insensitive duplicates dropped
(a duplicate would silently double a group's weight in training), and every dropped entry kept
in :attr:`PromptSet.skipped` with its line or row number so a user can find it in their file.

Sources:

- a registered prompt set, by name (:func:`register_prompt_source`): the toy world registers
  ``"toy"`` / ``"toy-heldout"``, its fixed training / evaluation split (craft/toyworld/plugin.py).
  Registered names win over a file of the same name; pass ``"./toy"`` to read such a file.
- ``"sample"``: ``assets/prompts/sample.txt``, a small shipped set of natural prompts in the style
  of HPDv2 / Parti-Prompts, for trying the real-model path without downloading a dataset.
- a file path (relative paths: working directory first, then the project root, as in
  :func:`craft.run.config.resolve_path`).

File formats (``format="auto"`` infers them from the extension, and for ``.json`` / ``.tsv`` /
``.csv`` from the content):

- ``txt``: one prompt per line; blank lines and lines starting with ``#`` are layout, not
  prompts, and are not reported as skipped.
- ``csv`` / ``tsv``: a header row, then one prompt per row; the prompt column is ``column`` or
  the first of ``prompt``, ``caption``, ``text`` (case-insensitive).
- ``json``: a list of strings, or a list of objects with a prompt field (HPDv2's ``test.json``
  and benchmark files have exactly these layouts). A ``.json`` file holding one object per line
  is read as jsonl.
- ``jsonl``: one JSON object (or string) per line.
- ``parquet``: only the prompt column is read, so Pick-a-Pic shards that also hold image bytes
  stay cheap; the size limit then applies to that column, not to the file.
- ``hpdv2``, ``parti``, ``pickapic``: the published layouts by name (HPDv2 ``test.json``, Parti
  ``PartiPrompts.tsv`` with columns Prompt/Category/Challenge/Note, Pick-a-Pic parquet or csv with
  a ``caption`` column repeated across many rows). They are what ``auto`` detects too; naming one
  only fixes the default column.

Nothing is ever unpickled: pickle, numpy and torch files are refused as unknown formats.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import logging
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from craft import CraftError
from craft.run.config import PROJECT_ROOT, resolve_path
from craft.run.choices import PROMPT_FORMATS

log = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 500
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
SAMPLE_PATH = PROJECT_ROOT / "assets" / "prompts" / "sample.txt"
# Registered prompt sets: name -> (loader returning the raw prompts, the format name reported
# in PromptSet.format, one line on what it is).
_SOURCES: dict[str, tuple[Callable[[], Sequence[str]], str, str]] = {}


def register_prompt_source(name: str, load: Callable[[], Sequence[str]], format: str,
                           description: str = "") -> None:
    """Make ``load_prompts(name)`` read ``load()`` (a plugin's built-in prompt set)."""
    _SOURCES[name] = (load, format, description)


def builtin_sources() -> list[str]:
    """Names ``prompts.source`` accepts besides a file path."""
    from craft.plugins import load_plugins

    load_plugins()
    return [*_SOURCES, "sample"]
FORMATS = PROMPT_FORMATS  # prompts.format (craft.run.choices)
# Auto-detected prompt columns, in order of preference (matched case-insensitively).
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "caption", "text")

_EXTENSIONS = {".txt": "txt", ".text": "txt", ".csv": "csv", ".tsv": "tsv", ".json": "json",
               ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_PARTI_COLUMNS = {"prompt", "category", "challenge", "note"}
# Pick-a-Pic rows hold a caption plus a pair of images and the human preference between them.
_PICKAPIC_MARKERS = {"caption", "label_0", "label_1"}
# Skip kinds, in the order the summary lists them.
_KINDS = ("duplicate", "empty", "too long", "not text", "invalid json", "missing field")


class PromptError(CraftError, ValueError):
    """A prompt source a user has to fix: missing, unreadable, of an unknown format, or empty."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """One entry of the source that did not become a prompt, and why.

    ``line`` is 1-based: a physical line for txt/jsonl, a data row (1 = first row after the
    header, or the first element of a JSON list) for csv/tsv/json/parquet; ``reason`` says which.
    """

    line: int
    text: str
    reason: str
    kind: str = "other"  # one of _KINDS; what the summary counts


@dataclasses.dataclass
class PromptSet:
    """The cleaned prompts of one source, in source order, with what was dropped and why."""

    prompts: list[str]
    skipped: list[Skipped]
    source: str
    format: str = ""
    column: str | None = None
    num_usable: int = 0  # usable prompts before max_prompts cut the set down
    max_prompts: int | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    def skip_counts(self) -> dict[str, int]:
        """How many entries were skipped per kind ("duplicate", "empty", ...)."""
        counts = collections.Counter(s.kind for s in self.skipped)
        order = {k: i for i, k in enumerate(_KINDS)}
        return dict(sorted(counts.items(), key=lambda kv: order.get(kv[0], len(order))))

    def summary(self) -> str:
        """One line for logs and the studio, e.g. ``kept 60, skipped 3 (2 duplicates, 1 empty)``."""
        text = f"kept {len(self.prompts)}"
        if self.num_usable > len(self.prompts):
            text += f" of {self.num_usable} usable (max_prompts={self.max_prompts})"
        text += f", skipped {len(self.skipped)}"
        counts = self.skip_counts()
        if counts:
            parts = [f"{n} {_plural(kind, n)}" for kind, n in counts.items()]
            text += f" ({', '.join(parts)})"
        return text


def _plural(kind: str, n: int) -> str:
    return kind + "s" if kind == "duplicate" and n != 1 else kind


# --------------------------------------------------------------------------------------------
# Cleaning: one pass shared by every source, so a prompt means the same whatever file it came in.


def normalize_prompt(text: str) -> str:
    """Strip and collapse runs of whitespace (tabs, newlines) to single spaces."""
    return " ".join(text.split())


def clean_prompts(entries: Iterable[tuple[int, Any]], unit: str = "line",
                  max_chars: int = DEFAULT_MAX_CHARS) -> tuple[list[str], list[Skipped]]:
    """Normalise ``(number, value)`` entries into prompts, recording every entry dropped.

    ``unit`` ("line" or "row") names what the numbers count, for the skip reasons. Duplicates are
    compared case-insensitively after normalisation and the first occurrence is kept, because
    "A cat" and "a cat" are the same group to a text encoder and training twice on it would
    double its weight.
    """
    prompts: list[str] = []
    skipped: list[Skipped] = []
    first_seen: dict[str, int] = {}
    for number, value in entries:
        if value is None or (isinstance(value, float) and value != value):  # None / NaN cell
            skipped.append(Skipped(number, "", f"empty {unit} {number} (no value)", "empty"))
            continue
        if not isinstance(value, str):
            skipped.append(Skipped(number, repr(value)[:200], f"{unit} {number} holds a "
                                   f"{type(value).__name__}, not text", "not text"))
            continue
        text = normalize_prompt(value)
        if not text:
            skipped.append(Skipped(number, value, f"empty {unit} {number}", "empty"))
            continue
        if len(text) > max_chars:
            skipped.append(Skipped(number, text, f"{unit} {number} is too long ({len(text)} "
                                   f"chars > max_chars={max_chars})", "too long"))
            continue
        key = text.casefold()
        if key in first_seen:
            skipped.append(Skipped(number, text, f"{unit} {number} duplicates {unit} "
                                   f"{first_seen[key]} (ignoring case)", "duplicate"))
            continue
        first_seen[key] = number
        prompts.append(text)
    return prompts, skipped


# --------------------------------------------------------------------------------------------
# Public entry point.


def load_prompts(source: str | Path, format: str = "auto", column: str | None = None,
                 max_prompts: int | None = None, *, max_chars: int = DEFAULT_MAX_CHARS,
                 max_bytes: int = DEFAULT_MAX_BYTES, seed: int | None = None) -> PromptSet:
    """Load, clean and optionally subsample a prompt set.

    ``source`` is "toy", "toy-heldout", "sample" or a file path; ``format`` one of
    :data:`FORMATS`; ``column`` the field holding the prompt text in tabular/JSON files (None =
    auto-detect among prompt/caption/text). ``max_prompts`` keeps the first N usable prompts, or,
    with ``seed``, a seeded random sample of N (in source order) - the paper samples its ~10k
    prompts from HPDv2 at random, and a file's head is often one category. ``max_chars`` drops
    over-long prompts (text encoders truncate at 77 tokens anyway); ``max_bytes`` refuses files
    larger than that, before reading them.

    Raises :class:`PromptError` naming the source, the problem and the fix.
    """
    _check_args(format, max_prompts, max_chars, max_bytes)
    name = str(source)
    if name in builtin_sources() and name != "sample":
        load, kind, _ = _SOURCES[name]
        prompts, skipped = clean_prompts(enumerate(load(), 1), "line", max_chars)
        result = PromptSet(prompts, skipped, name, kind)
    else:
        path = SAMPLE_PATH if name == "sample" else _find_file(name)
        result = _load_file(path, format, column, max_chars, max_bytes)
        result.source = name
    result.num_usable = len(result.prompts)
    if not result.prompts:
        counts = ", ".join(f"{n} {_plural(k, n)}" for k, n in result.skip_counts().items())
        raise PromptError(f"prompt source {name!r} has no usable prompts (skipped "
                          f"{len(result.skipped)}: {counts or 'nothing to read'}); "
                          f"check the file's contents{_column_hint(result)}")
    if max_prompts is not None and max_prompts < len(result.prompts):
        result.max_prompts = max_prompts
        if seed is None:
            result.prompts = result.prompts[:max_prompts]
        else:
            keep = sorted(random.Random(seed).sample(range(len(result.prompts)), max_prompts))
            result.prompts = [result.prompts[i] for i in keep]
    log.info("prompts from %s (%s): %s", name, result.format, result.summary())
    return result


def _column_hint(result: PromptSet) -> str:
    if result.column is None:
        return ""
    return f" and that column {result.column!r} holds the prompt text (pass column=... if not)"


def _check_args(format: str, max_prompts: int | None, max_chars: int, max_bytes: int) -> None:
    if format not in FORMATS:
        raise PromptError(f"format={format!r} is not a known prompt format; use one of "
                          f"{list(FORMATS)} ('auto' infers it from the file)")
    for arg, value, lowest in (("max_prompts", max_prompts, 1), ("max_chars", max_chars, 1),
                               ("max_bytes", max_bytes, 1)):
        if value is None and arg == "max_prompts":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise PromptError(f"{arg}={value!r} must be an integer >= {lowest}"
                              + ("; pass None to keep every prompt" if arg == "max_prompts"
                                 else ""))


def _find_file(name: str) -> Path:
    path = resolve_path(name)
    if path is None:
        places = " and ".join(dict.fromkeys(str(p) for p in (Path.cwd(), PROJECT_ROOT)))
        raise PromptError(f"prompt file {name!r} not found (looked in {places}); pass an "
                          f"existing file, or one of the built-in sets {builtin_sources()}")
    if not path.is_file():
        raise PromptError(f"prompt source {str(path)!r} is not a file; pass a .txt, .csv, .tsv, "
                          f".json, .jsonl or .parquet file")
    return path


# --------------------------------------------------------------------------------------------
# Files.


def _load_file(path: Path, format: str, column: str | None, max_chars: int,
               max_bytes: int) -> PromptSet:
    kind = _format_for(path, format)
    if kind == "parquet" or (kind == "pickapic" and _is_parquet(path)):
        return _read_parquet(path, format, column, max_chars, max_bytes)
    size = path.stat().st_size
    if size > max_bytes:
        raise PromptError(f"prompt file {str(path)!r} is {_mb(size)}, over the limit of "
                          f"{_mb(max_bytes)}; pass max_bytes={size} to read it anyway, or split "
                          f"it / keep only the prompt column")
    text = _read_text(path)
    if kind in ("json", "hpdv2"):
        return _read_json(path, text, format, column, max_chars)
    if kind == "jsonl":
        return _read_jsonl(path, text, format, column, max_chars)
    if kind in ("csv", "tsv", "parti", "pickapic"):
        return _read_table(path, text, kind, format, column, max_chars)
    prompts, skipped = clean_prompts(
        ((n, line) for n, line in enumerate(text.splitlines(), 1)
         if line.strip() and not line.lstrip().startswith("#")), "line", max_chars)
    return PromptSet(prompts, skipped, str(path), "txt")


def _format_for(path: Path, format: str) -> str:
    if format != "auto":
        return format
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise PromptError(f"cannot tell the format of prompt file {str(path)!r} from its "
                          f"extension {path.suffix or '(none)'!r}; rename it to one of "
                          f"{sorted(_EXTENSIONS)} or pass format= one of {list(FORMATS[1:])} "
                          f"(pickle and other binary formats are never read)")
    return kind


def _mb(n: int) -> str:
    return f"{n / 1024 ** 2:.1f} MB"


def _is_parquet(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"PAR1"


def _read_text(path: Path) -> str:
    """Decode a text file as UTF-8 (a BOM is allowed), refusing binary content with a fix."""
    data = path.read_bytes()
    if data[:4] == b"PAR1":
        raise PromptError(f"prompt file {str(path)!r} is a parquet file; pass format='parquet' "
                          f"or give it a .parquet extension")
    if b"\x00" in data[:8192]:
        raise PromptError(f"prompt file {str(path)!r} looks binary (it contains NUL bytes), not "
                          f"text; export the prompts as UTF-8 text, csv, jsonl or parquet")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PromptError(f"prompt file {str(path)!r} is not valid UTF-8 (byte {e.start}, line "
                          f"{line}); re-save it as UTF-8") from None


def _pick_column(path: Path, columns: Sequence[str], column: str | None, what: str,
                 preferred: Sequence[str] = PROMPT_COLUMNS) -> str:
    """The column holding prompt text: the one asked for, else the first preferred name."""
    if column is not None:
        if column in columns:
            return column
        folded = [c for c in columns if c.casefold() == column.casefold()]
        if len(folded) == 1:
            return folded[0]
        raise PromptError(f"prompt file {str(path)!r} has no {what} {column!r}; its {what}s are "
                          f"{list(columns)}; pass column= one of them")
    by_fold = {c.casefold(): c for c in reversed(list(columns))}
    for name in preferred:
        if name in by_fold:
            return by_fold[name]
    raise PromptError(f"prompt file {str(path)!r} has no prompt {what} (looked for "
                      f"{list(preferred)}, any case); its {what}s are {list(columns)}; pass "
                      f"column=<the {what} holding the prompt text>")


def _layout(explicit: str, columns: Iterable[str], generic: str) -> str:
    """Name a published dataset layout when the columns match one (for the summary)."""
    if explicit not in ("auto", "csv", "tsv", "json", "jsonl", "parquet"):
        return explicit
    folded = {c.casefold() for c in columns}
    if _PARTI_COLUMNS <= folded:
        return "parti"
    if _PICKAPIC_MARKERS <= folded:
        return "pickapic"
    return generic


def _read_table(path: Path, text: str, kind: str, format: str, column: str | None,
                max_chars: int) -> PromptSet:
    first = text.split("\n", 1)[0]
    tab = kind in ("tsv", "parti") or ("\t" in first and "," not in first)
    # strict: an opening quote that is never closed is an error, instead of a "prompt" that
    # swallows every line to the end of the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tab else ",",
                        strict=True)
    try:
        header = next(reader)
    except StopIteration:
        header = []
    except csv.Error as e:
        raise PromptError(f"prompt file {str(path)!r} is not valid csv ({e}); fix the header "
                          f"line or use a txt file with one prompt per line") from None
    if not [h for h in header if h.strip()]:
        raise PromptError(f"prompt file {str(path)!r} has no header row; add one naming the "
                          f"prompt column (e.g. 'prompt') or use a .txt file, one prompt a line")
    header = [h.strip() for h in header]
    preferred = {"parti": ("prompt",), "pickapic": ("caption",)}.get(kind, PROMPT_COLUMNS)
    name = _pick_column(path, header, column, "column", preferred)
    index = header.index(name)

    def rows() -> Iterator[tuple[int, Any]]:
        number, start = 0, reader.line_num + 1
        try:
            for number, row in enumerate(reader, 1):
                if not row:
                    continue  # a blank line in a csv is layout, as in txt
                yield number, row[index] if index < len(row) else None
                start = reader.line_num + 1
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise PromptError(f"prompt file {str(path)!r}: the quote opened in row "
                                  f"{number + 1} (line {start}) is never closed, so the rest of "
                                  f"the file would be read as one prompt; close the quote or "
                                  f"remove it") from None
            raise PromptError(f"prompt file {str(path)!r}: csv error near line "
                              f"{reader.line_num} ({e}); fix the quoting there") from None

    prompts, skipped = clean_prompts(rows(), "row", max_chars)
    return PromptSet(prompts, skipped, str(path), _layout(format, header, "tsv" if tab else "csv"),
                     name)


def _read_json(path: Path, text: str, format: str, column: str | None,
               max_chars: int) -> PromptSet:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: one object per line
            return _read_jsonl(path, text, format, column, max_chars)
        raise PromptError(f"prompt file {str(path)!r} is not valid JSON ({e.msg} at line "
                          f"{e.lineno}, column {e.colno}); fix it, or use jsonl (one object a "
                          f"line)") from None
    if not isinstance(data, list):
        raise PromptError(f"prompt file {str(path)!r} holds a JSON {type(data).__name__}; "
                          f"expected a list of strings or of objects with a prompt field "
                          f"(the HPDv2 layout)")
    result = _read_records(path, list(enumerate(data, 1)), [], format, column, "row", max_chars)
    keys = {k for item in data if isinstance(item, dict) for k in item}
    hpd = result.column == "prompt" and ("image_path" in keys or format == "hpdv2")
    result.format = "hpdv2" if hpd else "json"
    return result


def _read_jsonl(path: Path, text: str, format: str, column: str | None,
                max_chars: int) -> PromptSet:
    parsed: list[tuple[int, Any]] = []
    bad: list[Skipped] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            parsed.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            bad.append(Skipped(number, line[:200], f"line {number} is not valid JSON ({e.msg})",
                               "invalid json"))
    return _read_records(path, parsed, bad, format, column, "line", max_chars)


def _read_records(path: Path, records: list[tuple[int, Any]], bad: list[Skipped], format: str,
                  column: str | None, unit: str, max_chars: int) -> PromptSet:
    """Prompts from numbered JSON values: strings as they are, objects by their prompt field."""
    keys = list(dict.fromkeys(k for _, item in records if isinstance(item, dict) for k in item))
    name = _pick_column(path, keys, column, "field", _preferred(format)) if keys else None
    missing = [Skipped(n, json.dumps(item)[:200], f"{unit} {n} has no {name!r} field",
                       "missing field")
               for n, item in records if isinstance(item, dict) and name not in item]
    present = [(n, item[name] if isinstance(item, dict) else item) for n, item in records
               if not (isinstance(item, dict) and name not in item)]
    prompts, skipped = clean_prompts(present, unit, max_chars)
    skipped = sorted(bad + missing + skipped, key=lambda s: s.line)
    return PromptSet(prompts, skipped, str(path), _layout(format, keys, "jsonl"), name)


def _preferred(format: str) -> Sequence[str]:
    return {"hpdv2": ("prompt",), "pickapic": ("caption",), "parti": ("prompt",)}.get(
        format, PROMPT_COLUMNS)


def _read_parquet(path: Path, format: str, column: str | None, max_chars: int,
                  max_bytes: int) -> PromptSet:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt footer
        raise PromptError(f"prompt file {str(path)!r} is not a readable parquet file ({e}); "
                          f"re-export it, or use csv/jsonl") from None
    columns = meta.schema_arrow.names
    name = _pick_column(path, columns, column, "column", _preferred(format))
    # Pick-a-Pic shards carry image bytes beside the caption; only the caption counts here.
    md = meta.metadata
    size = sum(md.row_group(g).column(i).total_uncompressed_size
               for g in range(md.num_row_groups) for i in range(md.num_columns)
               if md.row_group(g).column(i).path_in_schema.split(".")[0] == name)
    if size > max_bytes:
        raise PromptError(f"column {name!r} of prompt file {str(path)!r} is {_mb(size)} "
                          f"uncompressed, over the limit of {_mb(max_bytes)}; pass "
                          f"max_bytes={size} to read it anyway, or split the file")
    values = meta.read(columns=[name]).column(0).to_pylist()
    prompts, skipped = clean_prompts(enumerate(values, 1), "row", max_chars)
    return PromptSet(prompts, skipped, str(path), _layout(format, columns, "parquet"), name)


__all__ = ["builtin_sources", "register_prompt_source", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_CHARS", "FORMATS",
           "PROMPT_COLUMNS", "PromptError", "PromptSet", "SAMPLE_PATH", "Skipped",
           "clean_prompts", "load_prompts", "normalize_prompt"]
