"""Evaluation and calibration text, tokenized once.

The default corpus is the documentation CPython ships in `pydoc_data.topics`: real English prose this
project did not write, present offline on every machine. A user file (`--eval-data`) may be plain
text (documents separated by blank lines) or JSONL (one {"text": ...} or a bare string per line).

Documents are split by a stable hash of their key into an evaluation part (1 in 4) and a calibration
part (the rest), so stages never calibrate on the text the harness scores.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import InputError
from compress.hashing import sha256_json

BUILTIN = "pydoc"
DOC_SEPARATOR = "\n\n"


class Split(enum.StrEnum):
    EVAL = "eval"
    CALIBRATION = "calibration"


@dataclass(frozen=True)
class Document:
    key: str
    text: str

    def split(self) -> Split:
        return Split.EVAL if hashlib.sha256(self.key.encode()).digest()[0] % 4 == 0 else Split.CALIBRATION


def load_documents(source: str) -> list[Document]:
    if source == BUILTIN:
        from pydoc_data import topics

        return [Document(k, topics.topics[k]) for k in sorted(topics.topics)]
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"evaluation data {source!r}: no such file (use {BUILTIN!r} or a .txt/.jsonl path)")
    if path.suffix not in (".jsonl", ".txt", ".md", ".text"):
        raise InputError(f"evaluation data {source!r}: unsupported extension {path.suffix!r}; use .txt or .jsonl")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as err:
        raise InputError(f"evaluation data {source!r}: not UTF-8 text (byte {err.start})") from None
    if path.suffix == ".jsonl":
        docs = _jsonl_documents(path, text)
    else:
        docs = [Document(f"{i}", p) for i, p in enumerate(p.strip() for p in text.split("\n\n")) if p]
    if not docs:
        raise InputError(f"evaluation data {source!r}: no text in it")
    return docs


def _jsonl_documents(path: Path, text: str) -> list[Document]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise InputError(f"{path}:{lineno}: expected a string or an object with a 'text' string")
        docs.append(Document(str(lineno), text))
    return docs


def token_stream(documents: list[Document], split: Split, tokenizer: Any) -> list[int]:
    text = DOC_SEPARATOR.join(d.text for d in documents if d.split() is split)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def windows_from(stream: list[int], count: int, length: int, what: str) -> list[list[int]]:
    """`count` windows of `length` tokens spread evenly over the stream (deterministic)."""
    if len(stream) < length + count - 1:
        raise InputError(f"{what} has {len(stream)} tokens; {count} windows of {length} need at least "
                         f"{length + count - 1} (use fewer/shorter windows or more text)")
    if count == 1:
        return [stream[:length]]
    step = (len(stream) - length) // (count - 1)
    return [stream[i * step: i * step + length] for i in range(count)]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """A user turn in the model's chat template (with the assistant prefix), or plain text without one."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(t) for t in ids]
    return list(tokenizer(prompt)["input_ids"])


@dataclass(frozen=True)
class EvalSet:
    """Everything the harness feeds every runtime: identical token ids for every candidate."""

    source: str
    windows: tuple[tuple[int, ...], ...]  # teacher-forced accuracy windows
    prompts: tuple[str, ...]
    prompt_ids: tuple[tuple[int, ...], ...]  # chat-formatted prompts for greedy generation
    latency_prompt: tuple[int, ...]  # prefill_len tokens for the latency protocol

    def digest(self) -> str:
        return sha256_json([self.windows, self.prompt_ids, self.latency_prompt])

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "windows": len(self.windows), "window_len": len(self.windows[0]),
                "prompts": len(self.prompts), "prefill_len": len(self.latency_prompt), "sha256": self.digest()}


def build_eval_set(tokenizer: Any, spec: Any, source: str | None = None) -> EvalSet:
    """The evaluation set for an `EvalSpec` (windows, prompts, latency prompt) under `tokenizer`."""
    source = source or spec.data
    documents = load_documents(source)
    stream = token_stream(documents, Split.EVAL, tokenizer)
    windows = windows_from(stream, spec.windows, spec.window_len, f"evaluation split of {source!r}")
    latency = windows_from(stream, 1, spec.prefill_len, f"evaluation split of {source!r}")[0]
    prompt_ids = tuple(tuple(encode_prompt(tokenizer, p)) for p in spec.prompts)
    return EvalSet(source, tuple(map(tuple, windows)), tuple(spec.prompts), prompt_ids, tuple(latency))


def calibration_windows(tokenizer: Any, source: str, count: int, length: int) -> list[list[int]]:
    """Calibration windows for stages, from the split the harness never scores."""
    documents = load_documents(source)
    stream = token_stream(documents, Split.CALIBRATION, tokenizer)
    return windows_from(stream, count, length, f"calibration split of {source!r}")
