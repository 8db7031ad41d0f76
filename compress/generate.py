"""Talk to a built artifact on its own runtime: `compress generate OUT_DIR --prompt ...` and `compress chat OUT_DIR`.

The artifact runs where it was verified (ExecuTorch, ONNX Runtime, Core ML's interpreter, llama.cpp or eager
PyTorch) through the same Session protocol the harness uses; the tokenizer and chat template are the source
model's. Tokens stream as they are produced; the timings printed after each answer are the runtime's own
(prefill tok/s over the prompt, decode tok/s over the answer), measured in this process, first call included.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from compress import models
from compress.errors import InputError, VerificationFailed
from compress.home import native_logs_in
from compress.manifest import Manifest
from compress.runtimes import RUNTIMES
from compress.runtimes.base import Session, prompt_logits
from compress.targets import parse_target


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy (the harness's choice)
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InputError(f"--max-tokens {self.max_tokens}: must be at least 1")
        if self.temperature < 0:
            raise InputError(f"--temperature {self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p {self.top_p}: must be in (0, 1]")


@dataclass
class Timing:
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_calls: int = 0
    decode_s: float = 0.0

    def describe(self, runtime: str) -> str:
        pre = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        dec = f"{self.decode_calls / self.decode_s:.1f} tok/s" if self.decode_s else "no decode step"
        return (f"{runtime}: {self.prompt_tokens} prompt tokens at {pre:.0f} tok/s (first token after "
                f"{self.prefill_s * 1e3:.0f} ms), {self.new_tokens} new, decode {dec}")


@dataclass
class Conversation:
    """An artifact, its tokenizer and one KV cache; what the cache holds is tracked so a follow-up prefills only
    the new tokens."""

    session: Session
    tokenizer: Any
    runtime: str
    stops: set[int]
    cached: list[int] = field(default_factory=list)  # the token ids the session's cache holds
    timing: Timing = field(default_factory=Timing)  # of the last generate()

    def encode(self, messages: list[dict[str, str]] | None, text: str | None) -> list[int]:
        if messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise InputError("the model's tokenizer has no chat template; use --raw to send the prompt as is")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return list(self.tokenizer(text or "").input_ids)

    def generate(self, ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        """Feed `ids` (the whole context: a prefix already cached is not fed again) and yield new token ids."""
        ids = list(ids)
        if len(ids) + 1 > self.session.max_context:
            raise InputError(f"the prompt is {len(ids)} tokens; the artifact holds {self.session.max_context} "
                             f"positions")
        keep = self.cached if ids[:len(self.cached)] == self.cached and len(ids) > len(self.cached) else []
        if not keep:
            self.session.reset()
        self.timing = timing = Timing(prompt_tokens=len(ids) - len(keep))
        rng = np.random.default_rng(sampling.seed)
        start = time.perf_counter()
        logits = prompt_logits(self.session, ids[len(keep):])
        timing.prefill_s = time.perf_counter() - start
        self.cached = ids
        for step in range(sampling.max_tokens):
            token = pick(logits, sampling, rng)
            timing.new_tokens += 1
            yield token
            full = len(self.cached) >= self.session.max_context
            if token in self.stops or step == sampling.max_tokens - 1 or full:
                break
            start = time.perf_counter()
            logits = self.session.decode(token)
            timing.decode_s += time.perf_counter() - start
            timing.decode_calls += 1
            self.cached = self.cached + [token]


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), sampling.top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))


def open_build(out_dir: Path, console: Any, threads: int | None = None) -> Conversation:
    """Load a finished build's artifact on its target's runtime, with the source model's tokenizer."""
    from transformers import AutoTokenizer

    from compress.verification import stop_ids

    manifest = Manifest.read(out_dir)
    with console.step("Checking artifact files against the manifest"):
        manifest.check_files(out_dir)
    target = parse_target(manifest.target["spec"], manifest.target["name"])
    runtime = RUNTIMES.get(target.runtime.name)
    available = runtime.availability()
    if not available.ok:
        from compress.errors import RuntimeUnavailable

        raise RuntimeUnavailable(f"runtime {target.runtime.name!r} is unavailable: {available.reason}")
    source = models.resolve(manifest.model["reopen"], console)
    tokenizer = AutoTokenizer.from_pretrained(source.checkpoint, trust_remote_code=False)
    threads = threads or target.runtime.threads
    with console.step(f"Loading the artifact on {target.runtime.name} ({threads} threads)"):
        try:
            with native_logs_in(out_dir / "logs"):
                session = runtime.load(manifest.artifact_obj(out_dir), threads)
        except Exception as err:  # noqa: BLE001  whatever the runtime raises, it refused the artifact
            first = (str(err).strip().splitlines() or [""])[0]
            raise VerificationFailed(f"{target.runtime.name} refused to load the artifact: "
                                     f"{type(err).__name__}: {first}") from None
    return Conversation(session, tokenizer, target.runtime.name, stop_ids(tokenizer))


def stream_text(tokens: Iterator[int], tokenizer: Any, stops: set[int], out: TextIO) -> list[int]:
    """Write the decoded text as tokens arrive (a multi-byte character waits for its last byte); returns the ids."""
    ids: list[int] = []
    shown = ""
    for token in tokens:
        if token in stops:
            break
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return ids


def chat_loop(conv: Conversation, sampling: Sampling, system: str | None, read: Callable[[], str | None],
              out: TextIO = sys.stdout, status: Callable[[str], None] = print) -> None:
    """Read a line, answer it, repeat; `/reset` starts over, `/exit` or end of input leaves."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        line = read()
        if line is None or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            status("(conversation reset)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = conv.encode(history, None)
            reply = stream_text(conv.generate(ids, sampling), conv.tokenizer, conv.stops, out)
        except InputError as err:
            history.pop()
            status(f"({err}; /reset to start over)")
            continue
        history.append({"role": "assistant", "content": conv.tokenizer.decode(reply, skip_special_tokens=True)})
        status(f"({conv.timing.describe(conv.runtime)})")
