"""rmm on the quality benchmark's adapters: storage vs accuracy of the reconstructed adapters, per p.

For each p, the adapters are merged into a reversible bundle through the real engine (dtype of the inputs, so the
byte ratio is fair), every task's adapter is rebuilt from the bundle and scored on its own task:

    normalized accuracy_t = acc(base + ΔŴ_t, task t) / acc(base + ΔW_t, task t)

Reference rows: the individual adapters (1.0, storing all T adapters), p = 0 (every task rebuilt as the mean of the
gauge-fixed factors: the paper's "separate merging") and the plain average ΔW* = (1/T) Σ_t ΔW_t, one merged adapter
scored on every task. Figures go between ``<!-- rmm:begin -->`` and ``<!-- rmm:end -->`` in docs/benchmarks.md.

    python -m benchmarks.rmm_quality [--set main] [--p 1,2,4,7] [--no-docs]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.docs import write_section



def rmm_bundle(adapter_dirs: list[Path], p: int, out: Path, dtype: str, gauge: str = "balanced",
               form: str = "positions"):
    """Merge the adapters with rmm at ``p`` (in ``form``) through the engine; returns the loaded bundle."""
    import yaml

    from lowrank_methods.formats.bundle import ReversibleBundle
    from lowrank_methods.pipeline.engine import run_merge
    from lowrank_methods.pipeline.recipe import parse_recipe

    recipe = {"merge_method": "rmm", "models": [{"model": str(d)} for d in adapter_dirs], "parameters": {"p": p, "gauge": gauge, "form": form},
              "dtype": dtype}
    run_merge(parse_recipe(yaml.safe_dump(recipe)), out, quiet=True, write_card=False)
    return ReversibleBundle.load(out)


def run(evaluator, dirs: list[Path], ps: list[int], set_name: str = "main", gauges=("balanced", "raw"), log=print) -> dict:
    """Score rmm bundles at every p (and the reference rows) for adapters ``dirs``, one per evaluator task."""
    from benchmarks.quality.methods import load_factors

    names = list(evaluator.tasks)
    factors = load_factors(dirs)
    own = {t: {m: fs[i] for m, fs in factors.items()} for i, t in enumerate(names)}
    individual = {t: evaluator.scores(own[t], "test", only=[t])[t] for t in names}
    log("individual: " + " ".join(f"{t} {a:.3f}" for t, a in individual.items()))
    dtype = str(next(iter(factors.values()))[0].A.dtype)
    stored_dtype = _adapter_dtype(dirs[0])

    average = {m: sum(f.dense() for f in fs) / len(fs) for m, fs in factors.items()}
    acc = evaluator.scores(average, "test")
    rows = [{"label": "individual adapters (all T stored)", "ratio": 1.0, "ratio_bytes": 1.0, "normalized": 1.0,
             "worst": 1.0, "error": 0.0},
            {"label": "plain average (one merged adapter)", "ratio": 1 / len(names), "ratio_bytes": None,
             "normalized": _mean(acc[t] / individual[t] for t in names),
             "worst": min(acc[t] / individual[t] for t in names), "error": None}]
    log(f"plain average: {rows[-1]['normalized']:.3f}")
    with tempfile.TemporaryDirectory() as scratch:
        runs = [(g, p, "positions") for g in gauges for p in [0, *ps]] + [("balanced", p, "shared") for p in ps]
        for gauge, p, form in runs:
            start = time.perf_counter()
            bundle = rmm_bundle(dirs, p, Path(scratch) / f"{form}-{gauge}-p{p}", stored_dtype, gauge, form)
            seconds = time.perf_counter() - start
            normalized, errors = {}, []
            for t, task in zip(names, bundle.tasks):  # bundle tasks are in recipe order: one adapter per task
                rebuilt = bundle.adapter(task, dtype=torch.float32)
                normalized[t] = evaluator.scores(rebuilt, "test", only=[t])[t] / individual[t]
                errors.append(_relative_error(rebuilt, own[t]))  # of the stored bundle, rounding included
            s = bundle.manifest["storage"]
            label = f"rmm p={p}, {gauge} gauge" + (" (mean of factors)" if p == 0 else " (exact)" if p == len(names) - 1 else "")
            if form == "shared":
                label = f"rmm form: shared, in the storage of p={p} (one Tucker-2 subspace per module)"
            rows.append({"label": label, "p": p, "gauge": gauge, "ratio": s["ratio"], "ratio_bytes": s["ratio_bytes"],
                         "normalized": _mean(normalized.values()), "worst": min(normalized.values()),
                         "error": _mean(errors), "per_task": normalized, "seconds": seconds})
            log(f"{label}: storage {s['ratio']:.3f}, normalized accuracy {rows[-1]['normalized']:.3f}, "
                f"mean rel. error {rows[-1]['error']:.3e}, merge {seconds:.1f} s")
    return {"set": set_name, "tasks": names, "individual": individual, "rows": rows, "compute_dtype": dtype,
            "bundle_dtype": stored_dtype, "machine": f"{platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads", "date": time.strftime("%Y-%m-%d")}


def table(result: dict) -> str:
    lines = ["| adapters kept as | storage (numbers) | storage (bytes) | mean normalized acc. | worst task | mean rel. error ΔW |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        byte = "" if row["ratio_bytes"] is None else f"{row['ratio_bytes']:.3f}"
        error = "" if row["error"] is None else f"{row['error']:.2e}"
        lines.append(f"| {row['label']} | {row['ratio']:.3f} | {byte} | {row['normalized']:.3f} | {row['worst']:.3f} | {error} |")
    return "\n".join(lines)


def publish(result: dict, command: str) -> None:
    T = len(result["tasks"])
    body = "\n".join([
        f"### Reversible Model Merging (rmm): storage vs accuracy, adapter set `{result['set']}`", "",
        f"{T} MiniLM adapters, one per task ({', '.join(result['tasks'])}). Each row keeps the adapters in a different form; a reconstructed "
        "adapter is scored on its own task and normalized by the original adapter's accuracy (test split). "
        f"Storage is relative to storing all {T} adapters (numbers: the paper's (p(r+T)+r)/(rT); bytes: "
        f"bundle.safetensors vs the adapter files, both {result['bundle_dtype']}). The plain average is one merged "
        "adapter scored on every task.", "", table(result), "",
        f"Command: `{command}`; {result['machine']}, {result['date']}."])
    write_section("rmm", body)


def _relative_error(rebuilt: dict, original: dict) -> float:
    """‖ΔŴ − ΔW‖ / ‖ΔW‖ over all modules together (dense: MiniLM's matrices are small)."""
    err = norm = 0.0
    for module, f in original.items():
        if f.rank == 0:
            continue
        ref = f.dense().double()
        got = rebuilt[module].dense().double() if module in rebuilt else torch.zeros_like(ref)
        err += float((got - ref).square().sum())
        norm += float(ref.square().sum())
    return (err / norm) ** 0.5 if norm else 0.0


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _adapter_dtype(path: Path) -> str:
    from lowrank_methods.formats.peft import AdapterSource

    return str(AdapterSource.open(path).dtype).removeprefix("torch.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rmm_quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="main", help="adapter set of benchmarks.quality (main, mixed, rslora)")
    parser.add_argument("--p", default="", help="comma-separated p values (default 1, 2, T/2, T-1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.quality import tasks as task_data
    from benchmarks.quality.evaluate import Evaluator
    from benchmarks.quality.model import load_minilm
    from benchmarks.quality.train import EXAMPLE_DIR, SETS

    root = EXAMPLE_DIR / SETS[args.set].directory
    names = [t for t in task_data.load() if (root / t / "adapter_config.json").is_file()]  # the adapters trained so far
    if len(names) < 2:
        raise SystemExit(f"need at least two trained adapters in {root}; run python -m benchmarks.quality.train")
    evaluator = Evaluator(load_minilm(), task_data.load(names=names))
    T = len(names)
    ps = [int(x) for x in args.p.split(",") if x.strip()] or sorted({1, 2, T // 2, T - 1} - {0})
    result = run(evaluator, [root / t for t in names], ps, args.set)
    print(table(result))
    if not args.no_docs:
        import sys

        command = "python -m benchmarks.rmm_quality " + " ".join(argv if argv is not None else sys.argv[1:])
        publish(result, command.strip())


if __name__ == "__main__":
    main()
