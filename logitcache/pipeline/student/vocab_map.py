"""Which teacher token is which student token: a map built from the tokens' byte strings.

The hybrid loss (losses/hybrid.py) compares teacher and student probabilities token by token
where both vocabularies hold the same token. TRL's GOLD matches the vocabularies' raw
strings; raw strings differ between tokenizer families for the very same bytes (byte-level
BPE writes a leading space as 'Ġ' and every byte as a printable stand-in, SentencePiece
writes it as '▁' and unknown bytes as '<0xNN>'), so we compare the bytes a token stands for:

* byte-level BPE (a ByteLevel decoder): every character is GPT-2's ``bytes_to_unicode``
  stand-in for one byte; the token is those bytes.
* SentencePiece family (a Metaspace decoder, or a Replace of '▁' by ' '): '▁' is a space;
  with byte fallback, '<0xNN>' is the byte NN.
* anything else: the token string, UTF-8 encoded.
* special tokens (BOS, EOS, UNK, PAD, chat markers) stand for no bytes: EOS maps to EOS,
  BOS to BOS, UNK to UNK, PAD to PAD, and any other special token to the special token of
  the same content.

One side may hold several tokens for the same bytes (SentencePiece's 'e' and its byte
fallback '<0x65>'). The map stays one-to-one, so no student token is counted twice: a
teacher token maps to the student token with the same bytes *and* the same kind (regular
token or byte-fallback piece); a teacher token left without one maps to the student's
*canonical* token of its bytes (the one its tokenizer emits: a regular token before a byte
piece, then the lowest id) if it is itself canonical and that student token is still free;
else to -1. Identical tokenizers thus map every id to itself.

The map is built once per tokenizer pair: kept per process, and on disk when a folder is
given (keyed by a hash of both tokenizers' definitions).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from logitcache.pipeline.token_bytes import ROLES, token_keys

def _first_ids(keys: list[Any], is_byte: list[bool], by_kind: bool) -> dict[Any, int]:
    """key (or (key, is_byte) when ``by_kind``) -> the lowest id holding it; regular tokens before
    byte pieces, so without ``by_kind`` this is the id a tokenizer emits for those bytes."""
    out: dict[Any, int] = {}
    for i in sorted(range(len(keys)), key=lambda i: (is_byte[i], i)):
        if keys[i] is not None:
            out.setdefault((keys[i], is_byte[i]) if by_kind else keys[i], i)
    return out


def _match(t_keys: list[Any], t_byte: list[bool], s_keys: list[Any], s_byte: list[bool]) -> np.ndarray:
    """teacher id -> student id, one-to-one: same bytes and the same kind (regular token or
    byte-fallback piece) first; then a teacher token left over takes the student's canonical
    token of its bytes, if it is the teacher's canonical one and that student token is free."""
    table = np.full(len(t_keys), -1, dtype=np.int64)
    taken: set[int] = set()
    s_kind = _first_ids(s_keys, s_byte, by_kind=True)
    for (k, b), t_id in _first_ids(t_keys, t_byte, by_kind=True).items():
        s_id = s_kind.get((k, b))
        if s_id is not None and s_id not in taken:
            table[t_id] = s_id
            taken.add(s_id)
    s_canon = _first_ids(s_keys, s_byte, by_kind=False)
    for k, t_id in _first_ids(t_keys, t_byte, by_kind=False).items():
        s_id = s_canon.get(k)
        if table[t_id] < 0 and s_id is not None and s_id not in taken:
            table[t_id] = s_id
            taken.add(s_id)
    return table


@dataclass(frozen=True)
class VocabMap:
    """teacher id -> student id of the same token (-1: none)."""

    teacher_to_student: np.ndarray  # int64 [teacher vocabulary]
    student_size: int

    @property
    def teacher_size(self) -> int:
        return len(self.teacher_to_student)

    @property
    def matched(self) -> int:
        """Teacher ids that have a student counterpart."""
        return int((self.teacher_to_student >= 0).sum())

    @property
    def matched_fraction(self) -> float:
        """Share of the teacher vocabulary that maps (GOLD's adaptive weight of the matched term)."""
        return self.matched / max(self.teacher_size, 1)

    def lookup(self, teacher_ids: np.ndarray) -> np.ndarray:
        """Student ids of ``teacher_ids`` (any shape); -1 where none, including ids beyond the vocabulary."""
        ids = np.asarray(teacher_ids, dtype=np.int64)
        inside = (ids >= 0) & (ids < self.teacher_size)
        return np.where(inside, self.teacher_to_student[np.where(inside, ids, 0)], -1)


def fingerprint(tokenizer) -> str:
    """A hash of everything that decides the map: the tokenizer definition and its special tokens."""
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8"))
    h.update(json.dumps(sorted(map(int, tokenizer.all_special_ids))).encode())
    h.update(json.dumps([getattr(tokenizer, f"{r}_id", None) for r in ROLES]).encode())
    return h.hexdigest()


_PROCESS_CACHE: dict[tuple[str, str], VocabMap] = {}


def build_vocab_map(teacher_tokenizer, student_tokenizer, cache_dir: str | Path | None = None) -> VocabMap:
    """The :class:`VocabMap` of a tokenizer pair (both fast tokenizers), built once.

    Args:
        teacher_tokenizer, student_tokenizer: transformers fast tokenizers.
        cache_dir: a folder to keep the map in (``vocab-map-<hash>.npy``), reused by later
            runs with the same pair; None keeps it for this process only.
    """
    key = (fingerprint(teacher_tokenizer), fingerprint(student_tokenizer))
    name = f"vocab-map-{hashlib.sha256('/'.join(key).encode()).hexdigest()[:20]}.npy"
    path = Path(cache_dir) / name if cache_dir is not None else None
    vm = _PROCESS_CACHE.get(key)
    if vm is None and path is not None and path.is_file():
        vm = _load(path, len(teacher_tokenizer))
    if vm is None:
        t_keys, t_byte = token_keys(teacher_tokenizer)
        s_keys, s_byte = token_keys(student_tokenizer)
        vm = VocabMap(_match(t_keys, t_byte, s_keys, s_byte), len(s_keys))
    _PROCESS_CACHE[key] = vm
    if path is not None and not path.is_file():
        from logitcache.storage.fsutil import atomic_write_bytes

        buf = io.BytesIO()
        np.save(buf, np.append(vm.teacher_to_student, vm.student_size))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    return vm


def _load(path: Path, teacher_size: int) -> VocabMap | None:
    """A saved map, or None when the file is damaged or does not fit (then it is rebuilt)."""
    try:
        table = np.load(path)
    except (OSError, ValueError):
        return None
    if table.ndim != 1 or len(table) != teacher_size + 1:
        return None
    return VocabMap(table[:-1].astype(np.int64), int(table[-1]))


def mapped_mass(teacher_logprobs: np.ndarray, student_ids: np.ndarray) -> tuple[float, float]:
    """(mass of the top-k entries that map, total top-k mass), summed over rows.

    Args:
        teacher_logprobs: [..., K] teacher top-k log-probabilities.
        student_ids: [..., K] their student ids (-1 where none).
    """
    p = np.exp(np.asarray(teacher_logprobs, dtype=np.float64))
    return float(p[np.asarray(student_ids) >= 0].sum()), float(p.sum())
