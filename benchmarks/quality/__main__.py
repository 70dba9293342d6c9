"""python -m benchmarks.quality: merge the bundled MiniLM adapters with every method, score every task, report.

Prints the table; saves the raw result as JSON under benchmarks/quality/results/, and rewrites the quality
section of docs/benchmarks.md and docs/img/quality.png from all saved results. Adapters are rebuilt by
``python -m benchmarks.quality.train`` (about 15 min per set); this command only merges and evaluates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
QUICK_LAMBDAS = (0.5, 1.0)


def main(argv=None) -> None:
    from .train import SETS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=[*SETS, "smollm2", "all"], default="main",
                        help="adapter set: main (rank 16), hetero (norms far apart), mixed (ranks 4/8/16), rslora "
                             "(rank 8, use_rslora), smollm2 (the causal LM), or all")
    parser.add_argument("--methods", default="", help="comma-separated labels or method names to run (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"λ ∈ {QUICK_LAMBDAS} only, no second-stage search")
    parser.add_argument("--lambdas", default="", help="comma-separated λ grid instead of the default (or --quick) one; "
                        "the search starts at 1 if it is in the grid, else at the middle value")
    parser.add_argument("--no-budget", action="store_true", help="skip the rank_budget variants (+budget16 rows)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the merge rows of results/<set>.json (same protocol) and run only the others")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's add_weighted_adapter peers")
    parser.add_argument("--no-docs", action="store_true", help="print only; do not touch results/ or docs/")
    parser.add_argument("--val-per-task", type=int, default=0,
                        help="validation items per task used to choose the parameters (default 0 = all 400)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the docs from results/*.json")
    args = parser.parse_args(argv)
    if args.report_only:
        from .report import publish

        return publish(RESULTS, ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "img" / "quality.png")

    from . import tasks as task_data
    from .harness import run_benchmark
    from .report import table

    torch.set_num_threads(args.threads)
    tasks = task_data.load()
    limit = args.val_per_task or None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] or None
    minilm = None
    for set_name in [*SETS, "smollm2"] if args.set == "all" else [args.set]:
        evaluator, dirs = open_set(set_name, tasks, limit, minilm)
        minilm = evaluator if set_name != "smollm2" else minilm
        done = []
        if args.resume and (RESULTS / f"{set_name}.json").is_file():
            from .report import load_result

            done = load_result(json.loads((RESULTS / f"{set_name}.json").read_text())).rows
        result = run_benchmark(evaluator, dirs, set_name=set_name, methods=methods, peers=not args.no_peft,
                               quick=QUICK_LAMBDAS if args.quick else None, budget=not args.no_budget,
                               lambdas=tuple(float(x) for x in args.lambdas.split(",") if x.strip()) or None,
                               on_row=lambda r: None if args.no_docs else save(r, args, argv), done=done)
        print(f"\n## adapter set `{set_name}` ({result.seconds / 60:.1f} min)\n")
        print(table(result))


def open_set(set_name: str, tasks, validation_limit: int | None = None, minilm=None):
    """The evaluator of an adapter set's base model (``minilm``: one already loaded) and its adapters by task."""
    from .train import EXAMPLE_DIR, SETS

    if set_name == "smollm2":
        from .causal import CausalEvaluator, load_smollm2
        from .train_causal import ADAPTER_DIR

        evaluator, adapters = CausalEvaluator(*load_smollm2(), tasks, validation_limit=validation_limit), ADAPTER_DIR
    else:
        from .evaluate import Evaluator
        from .model import load_minilm

        evaluator = minilm or Evaluator(load_minilm(), tasks, validation_limit=validation_limit)
        adapters = EXAMPLE_DIR / SETS[set_name].directory
    return evaluator, {t: adapters / t for t in evaluator.tasks}


def save(result, args, argv) -> None:
    """Write results/<set>.json and regenerate the docs section (after every candidate: partial runs keep rows)."""
    from .report import publish

    RESULTS.mkdir(exist_ok=True)
    record = {"result": {**asdict(result), "complete": result.complete},
              "command": "python -m benchmarks.quality " + " ".join(argv if argv is not None else _argv()),
              "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
                         f"1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"),
              "protocol": f"validation: {'first ' + str(args.val_per_task) if args.val_per_task else 'all'} items per task"
                          + (f", λ ∈ {{{args.lambdas}}}" if args.lambdas else "")
                          + (", quick: no second-stage search" if args.quick else ", full grid")
                          + ("" if args.lambdas or not args.quick else f" λ ∈ {set(QUICK_LAMBDAS)}")}
    (RESULTS / f"{result.set_name}.json").write_text(json.dumps(record, indent=1) + "\n")
    publish(RESULTS, ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "img" / "quality.png")


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
