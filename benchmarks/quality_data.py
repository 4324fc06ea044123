"""The quality benchmark's data: text no one here wrote, split by file, cut into windows.

Fixed before any result was looked at (see quality.py's docstring for the whole protocol):

* Documents: every top-level module of the Python standard library (``*.py`` directly in
  ``sysconfig.get_paths()["stdlib"]``; no packages, so no test suites and no site-packages),
  named by file name, plus every topic of ``pydoc_data.topics.topics`` (the language
  reference text that ``help()`` shows), named ``pydoc_data/topics/<topic>``.
* Split by document: documents in the order of sha256(name); held-out takes documents from
  the start of that order until it holds >= 5% of all characters, student-train the next
  ones until it holds >= 7%, teacher-train the rest (~88%). No document is in two splits.
* Windows: each document is cut at line boundaries into windows of consecutive whole lines,
  at most 1000 characters each (a window closes when the next line would make it longer; a
  single line longer than 1000 characters is cut into 1000-character pieces). Windows with
  no non-whitespace character are dropped. Each window is one ``text`` record (no prompt:
  every character is a target).
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

WINDOW_CHARS = 1000
HELDOUT_FRACTION = 0.05
STUDENT_FRACTION = 0.07


@dataclass
class Splits:
    teacher: list[str]  # windows
    student: list[str]
    heldout: list[str]
    documents: dict[str, list[str]]  # split -> document names

    def digest(self) -> str:
        h = hashlib.sha256()
        for name in ("teacher", "student", "heldout"):
            for w in getattr(self, name):
                h.update(name.encode() + b"\0" + w.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()[:16]


def documents() -> list[tuple[str, str]]:
    """(name, text) of every document, in a fixed order."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(f.name, f.read_text(encoding="utf-8", errors="replace")) for f in sorted(stdlib.glob("*.py"))]
    docs += [(f"pydoc_data/topics/{k}", v) for k, v in sorted(topics.items())]
    return [(n, t) for n, t in docs if t.strip()]


def windows(text: str, size: int = WINDOW_CHARS) -> list[str]:
    """``text`` cut into runs of whole lines of at most ``size`` characters (see the module docstring)."""
    out: list[str] = []
    cur = ""
    for line in text.splitlines(keepends=True):
        pieces = [line[i : i + size] for i in range(0, len(line), size)] if len(line) > size else [line]
        for piece in pieces:
            if cur and len(cur) + len(piece) > size:
                out.append(cur)
                cur = ""
            cur += piece
    if cur:
        out.append(cur)
    return [w for w in out if w.strip()]


def _order_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def make_splits() -> Splits:
    docs = sorted(documents(), key=lambda d: _order_key(d[0]))
    total = sum(len(t) for _, t in docs)
    parts: dict[str, list[tuple[str, str]]] = {"heldout": [], "student": [], "teacher": []}
    seen = 0
    for name, text in docs:
        if seen < HELDOUT_FRACTION * total:
            split = "heldout"
        elif seen < (HELDOUT_FRACTION + STUDENT_FRACTION) * total:
            split = "student"
        else:
            split = "teacher"
        parts[split].append((name, text))
        seen += len(text)
    return Splits(
        teacher=[w for _, t in parts["teacher"] for w in windows(t)],
        student=[w for _, t in parts["student"] for w in windows(t)],
        heldout=[w for _, t in parts["heldout"] for w in windows(t)],
        documents={k: [n for n, _ in v] for k, v in parts.items()},
    )


def write_jsonl(path: Path, texts: list[str], prefix: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"{prefix}-{i:05d}", "text": t}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


if __name__ == "__main__":
    s = make_splits()
    for name in ("teacher", "student", "heldout"):
        w = getattr(s, name)
        print(f"{name}: {len(s.documents[name])} documents, {len(w)} windows, {sum(map(len, w))} characters")
    print("digest", s.digest())
