"""llama.cpp latency child for scripts/bench_vs_llamacpp.py; runs in the bench venv (llama-cpp-python).

Reads a JSON request on stdin, prints one JSON line: the same protocol as runtimes/latency.py
(load, then warm-up + repeats of: reset -> prefill the prompt ids -> greedy-decode N tokens; medians;
peak RSS of this process). Token ids are fed directly, so both runtimes see the identical prompt.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import llama_cpp
import llama_cpp.llama
import numpy as np
from llama_cpp import Llama

# This machine's CPU advertises Intel AMX, but the VM does not grant AMX tile state: llama.cpp's AMX weight
# repacking ("extra buffer types") crashes in llama_decode (SIGSEGV, seen with llama-cpp-python 0.3.36).
# The high-level Llama class does not expose `use_extra_bufts`, so the peer starts from llama.cpp's default
# model params with it off and runs its ordinary AVX-512/AVX2 CPU kernels.
_defaults = llama_cpp.llama_model_default_params


def _without_extra_buffer_types():  # type: ignore[no-untyped-def]
    params = _defaults()
    params.use_extra_bufts = False
    return params


llama_cpp.llama.llama_cpp.llama_model_default_params = _without_extra_buffer_types


def _vm_hwm_mb() -> float:
    """Peak RSS of this address space (ru_maxrss would include the parent's, inherited across fork+exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def main() -> None:
    req = json.loads(sys.stdin.read())
    rss_before = _vm_hwm_mb()
    t0 = time.perf_counter()
    llm = Llama(model_path=req["gguf"], n_threads=req["threads"], n_threads_batch=req["threads"],
                n_ctx=req["n_ctx"], n_batch=req["n_ctx"], logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    prompt, n = req["prompt_ids"], req["decode_tokens"]
    ttft, decode = [], []
    for i in range(req["warmup"] + req["repeats"]):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(n):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        if i >= req["warmup"]:
            ttft.append(t1 - t0)
            decode.append(t2 - t1)
    print(json.dumps({"load_s": load_s, "ttft_s": statistics.median(ttft),
                      "prefill_tok_s": len(prompt) / statistics.median(ttft),
                      "decode_tok_s": n / statistics.median(decode), "ttft_all_s": ttft, "decode_all_s": decode,
                      "rss_before_load_mb": rss_before,
                      "peak_rss_mb": _vm_hwm_mb()}))


if __name__ == "__main__":
    main()
