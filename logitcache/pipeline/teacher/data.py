"""Stage 1 input: load records with `datasets` and turn each into (id, text, prompt_chars)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from itertools import islice
from typing import Any, Iterator

from logitcache.errors import LogitCacheError

# File extensions `datasets` reads with a packaged builder.
_BUILDERS = {
    ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text",
}


@dataclass
class TextTemplate:
    """How a record becomes the text the teacher reads. Exactly one of the three ways:

    * ``text_field``: the whole text (``prompt_chars`` = 0: every token is a target);
    * ``prompt_field`` + ``response_field``: ``prompt + separator + response``;
    * ``messages_field``: a chat (list of {role, content}) rendered with the tokenizer's
      chat template; the last message is the response.
    """

    text_field: str | None = None
    prompt_field: str | None = None
    response_field: str | None = None
    messages_field: str | None = None
    separator: str = ""
    id_field: str | None = None

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
        if mode == "generate":
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
            ("--id-field", t.id_field),
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
            d["chat_template_sha256"] = hashlib.sha256((chat_template or "").encode()).hexdigest()
        return d


def add_special_tokens_for(template: TextTemplate) -> bool:
    # A rendered chat template already holds BOS and the role markers as text.
    return template.kind != "messages"


def render(record: dict[str, Any], t: TextTemplate, tokenizer) -> tuple[str, int]:
    """(text, prompt_chars) for one record."""
    if t.kind == "text":
        return _as_str(record[t.text_field], t.text_field), 0
    if t.kind == "prompt_response":
        prompt = _as_str(record[t.prompt_field], t.prompt_field) + t.separator
        response = _as_str(record[t.response_field], t.response_field)
        return prompt + response, len(prompt) if response else -1
    messages = record[t.messages_field]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise LogitCacheError(f"--messages-field {t.messages_field!r} must hold a list of {{role, content}} objects.")
    if getattr(tokenizer, "chat_template", None) is None:
        raise LogitCacheError(
            "--messages-field needs a chat template, and the teacher tokenizer has none; "
            "use --prompt-field/--response-field instead."
        )
    if messages[-1].get("role") != "assistant":
        raise LogitCacheError(
            f"the last message of a chat must be the assistant's response (got role {messages[-1].get('role')!r})."
        )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    # Templates normally render the prompt as a prefix of the whole chat; where one does
    # not (e.g. it rewrites earlier turns), the shared prefix is the prompt.
    prompt_chars = len(os.path.commonprefix([full, prompt]))
    if not messages[-1].get("content"):
        prompt_chars = -1
    return full, prompt_chars


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
    messages = record[t.messages_field]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise LogitCacheError(f"--messages-field {t.messages_field!r} must hold a list of {{role, content}} objects.")
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages:
        return ""
    if getattr(tokenizer, "chat_template", None) is None:
        raise LogitCacheError("--messages-field needs a chat template, and the teacher tokenizer has none.")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _as_str(value: Any, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise LogitCacheError(f"field {field!r} holds a {type(value).__name__}, expected a string.")
    return value


def load_records(data: str, split: str = "train"):
    """Anything `datasets` loads: a file, a directory of files, or a hub dataset name."""
    import datasets

    path = Path(data)
    looks_like_path = path.suffix.lower() in _BUILDERS or os.sep in data or data.startswith(".")
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
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir():
            ds = datasets.load_dataset(str(path), split=split)
        elif looks_like_path:
            raise LogitCacheError(f"--data {data}: no such file or directory; check the path.")
        else:
            ds = datasets.load_dataset(data, split=split)
    except LogitCacheError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the gist and the place
        raise LogitCacheError(_explain_load_error(data, e)) from e
    finally:
        logger.setLevel(level)
    if len(ds) == 0:
        raise LogitCacheError(f"--data {data} holds no records; give data with at least one record.")
    return ds


def _explain_load_error(data: str, e: BaseException) -> str:
    path = Path(data)
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        where = _first_bad_json_line(path)
        if where:
            return f"--data {data}: {where}; fix or remove that line."
    root = e
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    text = str(root).strip()
    first = text.splitlines()[0] if text else type(root).__name__
    return f"--data {data}: could not be read ({type(root).__name__}: {first})."


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
) -> Iterator[tuple[int, str, str, int]]:
    """Yield (record index, id, text, prompt_chars) per record, in dataset order; ids are unique.

    ``prompt_chars`` is -1 for a record with an empty response. In generate mode ``text`` is
    the prompt alone and ``prompt_chars`` its length. Without an id field the id is a hash of
    the text; repeated texts get "-2", "-3", ... in order of appearance.
    """
    seen: dict[str, int] = {}
    n = len(ds) if limit is None else min(limit, len(ds))
    for i, record in enumerate(islice(ds, n)):
        if generate:
            text = render_prompt(record, t, tokenizer)
            prompt_chars = len(text)
        else:
            text, prompt_chars = render(record, t, tokenizer)
        if t.id_field:
            rid = str(record[t.id_field])
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
        yield i, rid, text, prompt_chars
