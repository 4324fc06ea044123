"""Input records for both stages: load them with `datasets`, render each through a template into
(id, text, target_spans). Stage 1 scores them; stage 2 evaluates students on the same templates.

``target_spans`` is a tuple of (start, end) character ranges of the text that are targets
(sorted, apart, non-empty; see storage/spans.py): for a prompt/response record the one span
``((len(prompt), len(text)),)``, or ``()`` for an empty response."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from itertools import islice
from typing import Any, Iterator, NamedTuple

from logitcache.errors import LogitCacheError
from logitcache.storage.integrity import MAX_ID_BYTES

# File extensions `datasets` reads with a packaged builder.
_BUILDERS = {
    ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text",
}
# Of those, the text formats: checked for UTF-8 before `datasets` reads them.
# A Hub dataset id: `name` or `owner/name` (letters, digits, - _ .).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


class _RecordError(LogitCacheError):
    """A problem with one record; ``iter_examples`` adds which one."""


@dataclass
class TextTemplate:
    """How a record becomes the text the teacher reads. Exactly one of the three ways:

    * ``text_field``: the whole text (one span over all of it: every token is a target), or with
      ``target_field`` the spans that field holds: a list of [start, end] character offsets
      into the text (sorted, not overlapping; empty pairs are dropped, touching ones joined);
    * ``prompt_field`` + ``response_field``: ``prompt + separator + response``;
    * ``messages_field``: a chat (list of {role, content}: system, user, assistant, tool, and
      assistant tool calls where the template renders them) rendered with the tokenizer's chat
      template; every assistant turn is a target (``pipeline/chat.py``), except one whose
      ``message_train_field`` (default "train") is false.
    """

    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None
    separator: str = ""
    id_field: str | None = None
    target_field: str | None = None
    # The per-message key that excludes an assistant turn from the targets (None: "train").
    message_train_field: str | None = None

    @property
    def train_key(self) -> str:
        """The per-message key that excludes an assistant turn from the targets."""
        return self.message_train_field or "train"

    @property
    def kind(self) -> str:
        if self.messages_field:
            return "messages"
        if self.prompt_field or self.response_field:
            return "prompt_response"
        return "text"

    def validate(self, mode: str = "score") -> None:
        ways = [bool(self.text_field), bool(self.prompt_field or self.response_field), bool(self.messages_field)]
        if sum(ways) > 1:
            raise LogitCacheError(
                "give one way to build the text: --text-field, or --prompt-field with --response-field, "
                "or --messages-field (not several)."
            )
        if self.target_field and (self.prompt_field or self.response_field or self.messages_field):
            raise LogitCacheError(
                "--target-field goes with --text-field (the spans are offsets into that text); "
                "drop --target-field, or build the text with --text-field."
            )
        if mode == "generate":
            if self.target_field:
                raise LogitCacheError("--mode generate: the teacher writes the response, which is the target; drop --target-field.")
            if self.response_field:
                raise LogitCacheError("--mode generate: the teacher writes the response; drop --response-field.")
        elif bool(self.prompt_field) != bool(self.response_field):
            raise LogitCacheError("--prompt-field and --response-field go together; give both.")

    def resolved(self, columns: list[str], mode: str = "score") -> "TextTemplate":
        """Fill in defaults from the data's columns and check every named field exists.

        In generate mode a prompt field alone is enough (the teacher writes the response).
        """
        self.validate(mode)
        t = TextTemplate(**asdict(self))
        if mode == "generate" and t.text_field is None and t.prompt_field is None and t.messages_field is None:
            if "prompt" in columns:
                t.prompt_field = "prompt"
            elif "messages" in columns:
                t.messages_field = "messages"
        if sum(map(bool, [t.text_field, t.prompt_field, t.messages_field])) == 0:
            if "text" in columns:
                t.text_field = "text"
            elif "prompt" in columns and "response" in columns:
                t.prompt_field, t.response_field = "prompt", "response"
            elif "messages" in columns:
                t.messages_field = "messages"
            else:
                raise LogitCacheError(
                    f"cannot tell which field holds the text; the data has fields: {', '.join(columns)}. "
                    "Pass --text-field, or --prompt-field and --response-field, or --messages-field."
                )
        if t.id_field is None and "id" in columns:
            t.id_field = "id"
        for opt, name in [
            ("--text-field", t.text_field), ("--prompt-field", t.prompt_field),
            ("--response-field", t.response_field), ("--messages-field", t.messages_field),
            ("--id-field", t.id_field), ("--target-field", t.target_field),
        ]:
            if name is not None and name not in columns:
                raise LogitCacheError(
                    f"{opt} {name!r}: no such field in the data; the fields are: {', '.join(columns)}."
                )
        return t

    def describe(self, add_special_tokens: bool, chat_template: str | None) -> dict[str, Any]:
        d: dict[str, Any] = {k: v for k, v in asdict(self).items() if v is not None}
        d["kind"] = self.kind
        d["add_special_tokens"] = add_special_tokens
        if self.kind == "messages":
            d["chat_template_sha256"] = chat_template_sha256(chat_template)
            # Every assistant turn a target (format 2); caches written before took the last
            # message alone as the response: a resume of one is refused, not mixed.
            d["chat_targets"] = "assistant_turns"
            d["message_train_field"] = self.train_key
        return d


def chat_template_sha256(chat_template: str | None) -> str:
    """The digest a chat cache's manifest records of the template that rendered it."""
    return hashlib.sha256((chat_template or "").encode()).hexdigest()


def add_special_tokens_for(template: TextTemplate) -> bool:
    # A rendered chat template already holds BOS and the role markers as text.
    return template.kind != "messages"


TargetSpans = tuple[tuple[int, int], ...]


class Example(NamedTuple):
    """One record as both stages read it (``iter_examples``)."""

    index: int  # in the dataset
    id: str
    text: str
    spans: TargetSpans
    # A chat record's messages as its template saw them (``chat_messages``), kept in the cache for
    # a student with a template of its own; None for other records and in generate mode.
    messages: list[dict[str, Any]] | None = None


def render(record: dict[str, Any], t: TextTemplate, tokenizer) -> tuple[str, TargetSpans, list[dict[str, Any]] | None]:
    """(text, target_spans, the chat or None) for one record (see the module)."""
    if t.kind == "text":
        text = _as_str(record[t.text_field], t.text_field)
        if t.target_field:
            return text, spans_from_field(record.get(t.target_field), t.target_field, len(text)), None
        return text, ((0, len(text)),) if text else (), None
    if t.kind == "prompt_response":
        prompt = _as_str(record[t.prompt_field], t.prompt_field) + t.separator
        response = _as_str(record[t.response_field], t.response_field)
        text = prompt + response
        return text, ((len(prompt), len(text)),) if response else (), None
    messages = chat_messages(record, t, tokenizer)
    return (*_render_messages(messages, t, tokenizer), messages)


def spans_from_field(value: Any, field: str, n_chars: int) -> TargetSpans:
    """A record's ``--target-field`` value as target spans, or a one-line refusal naming the problem.

    Unsorted or overlapping spans are refused rather than sorted or joined: they say the offsets
    were computed for another text (or another rendering of it), which no reordering repairs.
    """
    if hasattr(value, "tolist"):  # numpy arrays from some `datasets` formats
        value = value.tolist()
    pairs = _int_pairs(value)
    if pairs is None:
        raise _RecordError(
            f"--target-field {field!r} must hold a list of [start, end] pairs of whole-number character offsets "
            f"(got {_short_repr(value)})."
        )
    spans: list[tuple[int, int]] = []
    for start, end in pairs:
        if not 0 <= start <= end <= n_chars:
            raise _RecordError(
                f"--target-field {field!r}: span [{start}, {end}] is not within the text's {n_chars} characters "
                "(0 <= start <= end <= length)."
            )
        if spans and start < spans[-1][1]:
            raise _RecordError(
                f"--target-field {field!r}: span [{start}, {end}] starts before the previous one ends "
                f"({spans[-1][1]}); give the spans sorted and not overlapping."
            )
        if start == end:
            continue  # no characters: no target
        if spans and start == spans[-1][1]:
            spans[-1] = (spans[-1][0], end)  # touching spans are one
        else:
            spans.append((start, end))
    return tuple(spans)


def _int_pairs(value: Any) -> list[tuple[int, int]] | None:
    """``value`` as (int, int) pairs, or None. Whole floats count: `datasets` gives a column floats
    as soon as one record holds one, so the record holding the 1.5 is the one refused."""
    if not isinstance(value, (list, tuple)):
        return None
    out = []
    for pair in value:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            return None
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and float(x).is_integer() for x in pair):
            return None
        out.append((int(pair[0]), int(pair[1])))
    return out


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def chat_messages(record: dict[str, Any], t: TextTemplate, tokenizer) -> list[dict[str, Any]]:
    """The record's chat as templates see it (and the cache keeps it), checked to be a list of
    messages, for a tokenizer with a chat template.

    Without the null keys `datasets` adds so that every message of a column has the same fields
    (a tool call's ``tool_calls: null`` on every user message): a template asking whether a key
    is there would otherwise see keys the data never had.
    """
    messages = record[t.messages_field]
    if hasattr(messages, "tolist"):  # numpy arrays from some `datasets` formats
        messages = messages.tolist()
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _RecordError(f"--messages-field {t.messages_field!r} must hold a list of {{role, content}} objects.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise LogitCacheError(
            "--messages-field needs a chat template, and the teacher tokenizer has none; "
            "use --prompt-field/--response-field instead."
        )
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _render_messages(messages: list[dict[str, Any]], t: TextTemplate, tokenizer) -> tuple[str, TargetSpans]:
    """(text, the assistant turns' spans) of a chat; a chat without messages has neither."""
    from logitcache.pipeline.chat import render_chat

    if not messages:
        return "", ()
    try:
        return render_chat(messages, tokenizer, train_key=t.train_key)
    except LogitCacheError as e:  # about this record's chat: the caller names the record
        raise _RecordError(str(e)) from None


def render_prompt(record: dict[str, Any], t: TextTemplate, tokenizer) -> str:
    """The prompt the teacher answers in generate mode.

    ``--prompt-field`` (plus ``--separator``), a chat in ``--messages-field`` (rendered with
    the generation prompt; a trailing assistant message is dropped: the teacher writes its
    own), or ``--text-field`` (the whole text is the prompt).
    """
    if t.kind == "text":
        return _as_str(record[t.text_field], t.text_field)
    if t.kind == "prompt_response":
        prompt = _as_str(record[t.prompt_field], t.prompt_field)
        return prompt + t.separator if prompt else ""
    from logitcache.pipeline.chat import last_assistant_prefix

    messages = chat_messages(record, t, tokenizer)
    if not messages or (len(messages) == 1 and messages[0].get("role") == "assistant"):
        return ""
    try:
        return last_assistant_prefix(messages, tokenizer, train_key=t.train_key)
    except LogitCacheError as e:
        raise _RecordError(str(e)) from None


def _as_str(value: Any, field: str) -> str:
    if value is None:
        raise _RecordError(f"field {field!r} is missing (or null); give every record that field, or drop the record.")
    if not isinstance(value, str):
        raise _RecordError(f"field {field!r} holds a {type(value).__name__}, expected a string.")
    return value


# Arrow types a text field may have: strings, or all-null (caught as missing).
def _is_text_type(typ) -> bool:
    import pyarrow as pa

    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)


def check_records(ds, t: TextTemplate) -> None:
    """Every record has the template's fields, text fields hold strings: checked over the whole
    table at once (Arrow, no Python loop), so a bad record 900k stops the run before it starts.

    ``t`` is a resolved template. Raises ``LogitCacheError`` naming the field and the first
    bad record (counted from 1, as a JSON-lines file's records are its non-empty lines).
    """
    table = getattr(ds, "data", None)
    table = getattr(table, "table", table)
    if table is None or getattr(ds, "_indices", None) is not None:
        return  # a view (select/shuffle): rows are checked one by one as they are read
    for opt, name, text in [
        ("--text-field", t.text_field, True), ("--prompt-field", t.prompt_field, True),
        ("--response-field", t.response_field, True), ("--messages-field", t.messages_field, False),
        ("--id-field", t.id_field, False), ("--target-field", t.target_field, False),
    ]:
        if name is None or name not in table.column_names:
            continue
        column = table.column(name)
        if text and not _is_text_type(column.type):
            raise LogitCacheError(
                f"{opt} {name!r} holds {column.type} values, expected text; name a field of strings."
            )
        if name == t.id_field and _is_text_type(column.type):
            import pyarrow.compute as pc

            too_long = pc.greater(pc.binary_length(column), MAX_ID_BYTES)
            if pc.any(too_long).as_py():
                first = pc.index(too_long, True).as_py()
                raise LogitCacheError(_id_too_long(name, first, len(column[first].as_py().encode("utf-8", "surrogatepass"))))
        if column.null_count and not (text and nulls_are_empty(ds)):
            import pyarrow.compute as pc

            first = pc.index(pc.is_null(column), True).as_py()
            raise LogitCacheError(
                f"record {first + 1}: field {name!r} is missing (or null); give every record that field, or drop the record."
            )


def _id_too_long(field: str, index: int, n_bytes: int) -> str:
    return (f"record {index + 1}: --id-field {field!r} holds an id of {n_bytes:,} bytes, more than an id may have "
            f"({MAX_ID_BYTES:,}); name a field of short ids, or none (each text's hash is then its id).")


def nulls_are_empty(ds) -> bool:
    """CSV has no null: an empty cell is read as one. Its text fields are then empty strings,
    skipped like JSON's "" (an empty text or response), not refused as missing."""
    return getattr(getattr(ds, "info", None), "builder_name", None) == "csv"


def load_records(data: str, split: str = "train"):
    """Anything `datasets` loads: a file, a directory of files, or a hub dataset name."""
    import datasets

    path = Path(data)
    # `owner/name` is a hub id, not a path, unless it exists here: only what cannot be a hub id
    # (a data file's suffix, ./ ../ / ~, more than one /) is refused as a missing path.
    looks_like_path = path.suffix.lower() in _BUILDERS or not _HUB_ID.fullmatch(data)
    # datasets logs its own traceback before raising; we report the problem in one line.
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        if path.is_file():
            builder = _BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise LogitCacheError(
                    f"--data {data}: unknown file type {path.suffix!r}; use one of {', '.join(sorted(_BUILDERS))}."
                )
            if path.stat().st_size == 0:
                raise LogitCacheError(f"--data {data} is empty; give a file with at least one record.")
            if path.suffix.lower() in _TEXT_SUFFIXES:
                check_utf8(path, f"--data {data}")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir():
            _refuse_mixed_formats(path, data)
            for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in _TEXT_SUFFIXES and p.is_file()):
                check_utf8(file, f"--data {data}: {file.relative_to(path)}")
            ds = datasets.load_dataset(str(path), split=split)
        elif looks_like_path:
            raise LogitCacheError(f"--data {data}: no such file or directory; check the path.")
        else:
            try:
                ds = datasets.load_dataset(data, split=split)
            except Exception as e:
                raise LogitCacheError(_explain_hub_error(data, e)) from e
    except LogitCacheError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the gist and the place
        raise LogitCacheError(_explain_load_error(data, e)) from e
    finally:
        logger.setLevel(level)
    if len(ds) == 0:
        raise LogitCacheError(f"--data {data} holds no records; give data with at least one record.")
    return ds


def _refuse_mixed_formats(path: Path, data: str) -> None:
    """A directory holding data files of two formats: `datasets` would read only the most common
    format and drop the other files' records without a word, so refuse, naming them."""
    by_builder: dict[str, list[str]] = {}
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path)
        if file.is_file() and file.suffix.lower() in _BUILDERS and not any(part.startswith(".") for part in rel.parts):
            by_builder.setdefault(_BUILDERS[file.suffix.lower()], []).append(rel.as_posix())
    if len(by_builder) > 1:
        listed = "; ".join(f"{builder}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
                           for builder, files in sorted(by_builder.items()))
        raise LogitCacheError(
            f"--data {data} mixes data formats ({listed}), and only one format per directory can be read; "
            "convert the files to one format, or give one directory per format."
        )


def check_utf8(path: Path, where: str, block_size: int = 1 << 22) -> None:
    """Refuse a text file that is not UTF-8, naming the line and byte (datasets would fail later,
    mid-run, or read it as garbage). Reads the file once, in blocks."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes read before this block
    newlines = 0  # b"\n" before this block
    last_newline = -1  # file offset of the last b"\n" before this block
    with open(path, "rb") as f:
        while True:
            block = f.read(block_size)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                # err.object: the decoder's pending bytes (part of one character, no b"\n") + block
                base = offset - (len(err.object) - len(block))
                before = err.object[: err.start]
                nl = before.rfind(b"\n")
                line_start = base + nl + 1 if nl >= 0 else last_newline + 1
                bad = base + err.start
                bad_line = newlines + before.count(b"\n") + 1
                raise LogitCacheError(
                    f"{where}: line {bad_line} is not valid UTF-8 (byte 0x{err.object[err.start]:02x} at "
                    f"byte {bad - line_start + 1} of the line, offset {bad} in the file); "
                    "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
            if not block:
                return
            newlines += block.count(b"\n")
            nl = block.rfind(b"\n")
            if nl >= 0:
                last_newline = offset + nl
            offset += len(block)


def _explain_load_error(data: str, e: BaseException) -> str:
    path = Path(data)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        where = _first_bad_json_line(path)
        if where:
            return f"--data {data}: {where}; fix or remove that line."
    root = _root_cause(e)
    if path.is_dir() and type(root).__name__ in ("EmptyDatasetError", "DataFilesNotFoundError"):
        return (
            f"--data {data}: a directory with no data files; put {', '.join(sorted(_BUILDERS))} files "
            "in it, or give a file."
        )
    return f"--data {data}: could not be read ({type(root).__name__}: {_first_line(root)})."


def _explain_hub_error(data: str, e: BaseException) -> str:
    root = _root_cause(e)
    chain = f"{type(e).__name__} {e} {type(root).__name__} {root}"
    where = f"--data {data}: not a local path, so it was tried as the Hugging Face Hub dataset {data!r}"
    if "Offline" in chain or "not cached" in chain or isinstance(e, ConnectionError):
        offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")]
        why = f"{'/'.join(offline)} is set" if offline else "the Hub cannot be reached"
        return (
            f"{where}, which is not in the local datasets cache and {why}; download it first "
            f"where there is network access{' (without ' + '/'.join(offline) + ')' if offline else ''}, or give a local path."
        )
    if type(root).__name__ in ("DatasetNotFoundError", "RepositoryNotFoundError"):
        return f"{where}, which is not on the Hub (or is private: log in with `hf auth login`); check the name, or give a local path."
    return f"{where}, which could not be loaded ({type(root).__name__}: {_first_line(root)})."


def _root_cause(e: BaseException) -> BaseException:
    root = e
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    return root


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _first_bad_json_line(path: Path) -> str | None:
    """Scan a JSON-lines file for the first line that is not a JSON object (only after a failure)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {n} is not valid UTF-8 (byte {err.start})"
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {n} is not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(value, dict):
                return f"line {n} is a JSON {type(value).__name__}, expected an object with fields"
    return None


def dataset_fingerprint(data: str, ds) -> str:
    """Identifies the input's content: file bytes for local files, `datasets`' fingerprint otherwise."""
    path = Path(data)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return str(getattr(ds, "_fingerprint", "unknown"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def iter_examples(
    ds, t: TextTemplate, tokenizer, limit: int | None = None, *, generate: bool = False
) -> Iterator[Example]:
    """Yield each record as an :class:`Example`, in dataset order; ids are unique.

    ``target_spans`` is ``()`` for a record with no target (an empty response). In generate
    mode ``text`` is the prompt alone and ``target_spans`` ``((len(text), len(text)),)``: the
    response the teacher writes starts there. Without an id field the id is a hash of
    the text; repeated texts get "-2", "-3", ... in order of appearance.
    """
    if limit is not None and limit < 0:
        raise LogitCacheError(f"--limit must be 0 or more (got {limit}).")
    check_records(ds, t)
    seen: dict[str, int] = {}
    n = len(ds) if limit is None else min(limit, len(ds))
    empty_cells = nulls_are_empty(ds)
    text_fields = [f for f in (t.text_field, t.prompt_field, t.response_field) if f]
    for i, record in enumerate(islice(ds, n)):
        if empty_cells:
            record = {**record, **{f: "" for f in text_fields if record.get(f, "") is None}}
        try:
            if generate:
                text, messages = render_prompt(record, t, tokenizer), None
                spans: TargetSpans = ((len(text), len(text)),)
            else:
                text, spans, messages = render(record, t, tokenizer)
        except _RecordError as e:
            raise LogitCacheError(f"record {i + 1}: {e}") from e
        if t.id_field:
            rid = str(record[t.id_field])
            # (a view of a dataset, which check_records cannot scan; a character is at most 4 bytes)
            if len(rid) * 4 > MAX_ID_BYTES and len(rid.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
                raise LogitCacheError(_id_too_long(t.id_field, i, len(rid.encode("utf-8", "surrogatepass"))))
            if rid in seen:
                raise LogitCacheError(
                    f"--id-field {t.id_field!r}: id {rid!r} appears twice (records {seen[rid]} and {i}); ids must be unique."
                )
            seen[rid] = i
        else:
            base = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            count = seen.get(base, 0) + 1
            seen[base] = count
            rid = base if count == 1 else f"{base}-{count}"
        yield Example(i, rid, text, spans, messages)
