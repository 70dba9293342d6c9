"""Per-layer timing of the low-rank methods on one Llama-7B-shaped decoder layer (×32 ≈ the whole model).

    python -m benchmarks.layer_timing                     # ctm, core_space, knots, mtc; 8 adapters, rank 16, float32
    python -m benchmarks.layer_timing --methods ctm --rule ta --threads 2

Factors share half their subspace across tasks and have decaying spectra (benchmarks/synthetic.py, layer 0),
so the HOOI in ctm converges as it would on real adapters. Reports wall seconds per layer, ×32, CPU seconds (÷ threads ≈ wall on an idle machine) and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from benchmarks.synthetic import layer_factors
from lowrank_methods.core.types import MethodContext
from lowrank_methods.core.method import get_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="ctm,core_space,knots,mtc")
    ap.add_argument("--rule", default="ties", help="rule for the methods that take one (mtc uses ta unless --mtc-rule)")
    ap.add_argument("--mtc-rule", default="ta")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    layer = layer_factors(args.adapters, args.rank)
    weights = [1.0] * args.adapters
    print(f"{args.adapters} adapters, rank {args.rank}, float32, {args.threads} threads")
    for name in args.methods.split(","):
        meth = get_method(name)
        values = {"rank": args.rank}
        if "rule" in meth.fields:
            values["rule"] = args.mtc_rule if name == "mtc" else args.rule
        per_module, cpu = {}, 0.0
        for module, factors in layer.items():
            params, ctx = meth.parse_params(values), MethodContext(module)
            start, cpu_start = time.perf_counter(), time.process_time()
            meth(factors, weights, params, ctx)
            per_module[module.rsplit(".", 1)[-1]] = time.perf_counter() - start
            cpu += time.process_time() - cpu_start
        total = sum(per_module.values())
        detail = " ".join(f"{k}={v:.2f}" for k, v in per_module.items())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{name:12s} rule={values.get('rule', '-'):9s} {total:6.2f} s/layer  ×32 = {32 * total:6.1f} s  "
              f"(CPU {cpu:.2f} s, ×32 = {32 * cpu:.1f} s)  peak RSS {rss:.2f} GiB  ({detail})")


if __name__ == "__main__":
    main()
