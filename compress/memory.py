"""How much memory a build will need, estimated from the model's config before anything is loaded.

peak ≈ BASE + copies × fp32 weight bytes + logits, where BASE is the interpreter with torch, transformers and the
runtimes imported, `copies` how many fp32-sized copies of the weights the heaviest step holds at once, and
`logits` the fp32 logits the harness and the quantize stage's KL probe hold (rows × vocabulary). They come from
measured builds (docs/scale.md; `/usr/bin/time -v`, 2-core AMD EPYC, 24 GiB): on smollm2-360m-shape (1.45 GB of
fp32 weights) android (pte) peaked at 6.53 GB, 3.1 copies, in the quantize stage's mixed-precision search (the
reference, the smoothed model the search overwrites with its trials, the probe); web's export and verification
after the same (cached) stage at 5.06 GB; android-small (prune and distill: teacher, student, gradients and
Adam's two moments) at 5.4 GB on 135M; desktop-gguf (no stage: the reference itself is written) at 8.9 GB on
llama-3.2-1b-shape (4.9 GB of fp32 weights, 0.8 copies beside the logits and the base). The estimate rounds those up.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

GB = 1e9
BASE_BYTES = 2.0 * GB


class Work(StrEnum):
    """What a target does to the weights before its export, which sets how many copies its heaviest step holds."""

    EXPORT = "export"  # no stage: the fp32 reference itself is exported and verified
    QUANTIZE = "quantize"  # stages that only quantize: the reference, the stage's candidate, the export module
    TRAIN = "train"  # a prune/distill stage: teacher + student + gradients + Adam's two moments + activations


COPIES = {Work.EXPORT: 1.5, Work.QUANTIZE: 3.5, Work.TRAIN: 7.0}
LOGIT_ROWS = 3 * 8 * 256  # reference and candidate over the default eval set (8 x 256), and the stage's probe


def parameter_count(config: Any) -> int:
    """Parameters of a Llama from its config (tied output matrix counted once)."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = hidden * (2 * q + 2 * kv) + 3 * hidden * config.intermediate_size + 2 * hidden
    embeddings = vocab * hidden * (1 if config.tie_word_embeddings else 2)
    return embeddings + layers * per_layer + hidden


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    peak_bytes: float
    copies: float
    logits_bytes: float

    def describe(self) -> str:
        return (f"~{self.peak_bytes / GB:.1f} GB ({self.parameters / 1e9:.2f}B parameters: "
                f"{self.copies:g} fp32 copies of {self.parameters * 4 / GB:.1f} GB, {self.logits_bytes / GB:.1f} GB "
                f"of logits, plus {BASE_BYTES / GB:.0f} GB)")


def estimate(config: Any, work: Work) -> MemoryEstimate:
    """The peak of a build of `config` for a target whose stages do `work`."""
    params = parameter_count(config)
    copies = COPIES[work]
    logits = LOGIT_ROWS * config.vocab_size * 4
    return MemoryEstimate(params, BASE_BYTES + copies * 4 * params + logits, copies, logits)


def available_bytes(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """MemAvailable (what can be allocated without swapping), or None where the kernel does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None
