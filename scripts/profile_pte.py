"""Where a decode step of a `.pte` spends its time, per operator, from ExecuTorch's own profiler (ETDump).

    .venv/bin/python scripts/profile_pte.py out/android/model.pte [--prompt 128] [--decode 64] [--threads 2]

Prefills a `--prompt`-token prompt, then decodes `--decode` tokens one by one (positions prompt..prompt+decode),
all under ETDump, and prints per-token milliseconds by operator name (XNNPACK's own op names inside delegates,
kernel names outside), the number of delegate calls, and the time the profiler does not attribute to any op
(the gaps between ops: delegate entry, input resizing, the executor's own work). The profiler's overhead
inflates the total a little; compare rows within one run, not with `compress bench`.
"""

from __future__ import annotations

import argparse
import collections
import re
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pte", type=Path)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--mkl-threads", type=int, default=1, help="torch/MKL threads (custom ops call MKL on x86)")
    args = parser.parse_args()

    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    _unsafe_reset_threadpool(args.threads)
    if args.mkl_threads:
        torch.set_num_threads(args.mkl_threads)
    data = args.pte.with_name("model.ptd")  # the weights, when the program keeps them outside
    program = Runtime.get().load_program(args.pte, enable_etdump=True, debug_buffer_size=0,
                                         data_path=data if data.is_file() else None)
    method = program.load_method("forward")
    tokens = torch.randint(0, 1000, (1, args.prompt))
    method.execute([tokens, torch.tensor([0])])
    wall = []
    for i in range(args.decode):
        start = time.perf_counter()
        method.execute([torch.tensor([[1 + i]]), torch.tensor([args.prompt + i])])
        wall.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "etdump.etdp")
        program.write_etdump_result_to_file(path, str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=path)

    per_op: collections.Counter[str] = collections.Counter()  # ms per decode token
    count: collections.Counter[str] = collections.Counter()
    total_method = None
    delegate_calls = 0
    for block in inspector.event_blocks:
        for event in block.events:
            if event.perf_data is None:
                continue
            raw = list(event.perf_data.raw)
            if len(raw) < args.decode + 1:
                continue
            decode = raw[-args.decode:]  # the first run is the prefill
            ms = statistics.fmean(decode)
            if event.name == "Method::execute":
                total_method = ms
                continue
            if event.name in ("OPERATOR_CALL", "DELEGATE_CALL"):
                delegate_calls += event.name == "DELEGATE_CALL"
                if event.name == "OPERATOR_CALL":
                    continue
            name = re.sub(r"( GEMM)? #\d+$", "", event.name)  # XNNPACK numbers ops within a delegate
            per_op[name] += ms
            count[name] += 1
    spans = per_op.pop("DELEGATE_CALL", 0.0)
    count.pop("DELEGATE_CALL", None)
    inside = sum(v for k, v in per_op.items() if not k.startswith(("native_call", "llama::")))
    outside = sum(v for k, v in per_op.items() if k.startswith(("native_call", "llama::")))
    print(f"{args.pte}: decode at positions {args.prompt}..{args.prompt + args.decode}, {args.threads} threads")
    print(f"wall (profiled): median {1000 * statistics.median(wall):.2f} ms/token; Method::execute "
          f"{total_method or float('nan'):.2f} ms; delegate calls per token: {delegate_calls}")
    print(f"{'op':60s} {'ms/token':>9s} {'nodes':>6s}")
    for name, ms in per_op.most_common(args.top):
        print(f"{name[:60]:60s} {ms:9.3f} {count[name]:6d}")
    print(f"XNNPACK ops {inside:.2f} ms; delegate calls {spans:.2f} ms, of which {spans - inside:.2f} ms outside any "
          f"op; kernels outside delegates {outside:.2f} ms; rest of Method::execute "
          f"{(total_method or 0) - spans - outside:.2f} ms")


if __name__ == "__main__":
    main()
