"""A λ per module type: attention (q/k/v/o) and MLP apart, for merges already chosen by the benchmark.

Every merge here is linear in λ module by module, and the rank budget allocates by each module's *relative*
spectrum, so scaling one module type's merged update by λ_type/λ is exactly the merge a recipe writes as

    lambda: [{filter: self_attn, value: λ_attn}, {value: λ_mlp}]      (MiniLM: filter: attention)

Starting from the shared λ that ``python -m benchmarks.quality`` chose (results/<set>.json), λ_attn and then λ_mlp
are hill-climbed on validation over ``GRID``; the choice is scored once on test and compared, by the paired
bootstrap, with the shared-λ row and with a peer row. PEFT's merges get the same search (its merged ``lora_B``
scaled per module type), so the comparison stays fair.

    python -m benchmarks.quality.module_lambda --set smollm2 --labels peft:ties_svd,mtc[tsv],tsv+budget16
"""

from __future__ import annotations

import argparse
import json

import torch

from lowrank_methods.core.types import LoraFactors

from . import stats
from .harness import accuracies, climb_index, mean, normalize
from .methods import load_factors, package_candidates
from .report import load_result

GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
ATTENTION = ("self_attn", "attention")  # module-name substrings of the attention projections (SmolLM2, MiniLM)


def by_module_type(deltas: dict, lam_attention: float, lam_mlp: float) -> dict:
    """The merged updates with attention modules scaled by ``lam_attention`` and all others by ``lam_mlp``."""
    out = {}
    for module, d in deltas.items():
        s = lam_attention if any(a in module for a in ATTENTION) else lam_mlp
        out[module] = LoraFactors(d.A, d.B * s) if isinstance(d, LoraFactors) else d * s
    return out


def climb(score, start: tuple[float, float], grid: tuple[float, ...] = GRID) -> tuple[float, float]:
    """Coordinate hill-climbing on ``grid`` (plus the start values): λ_attn first, then λ_mlp, each from ``start``."""
    grid = tuple(sorted({*grid, *start}))
    best = list(start)
    for k in (0, 1):
        at = lambda j: score(*[grid[j] if n == k else best[n] for n in (0, 1)])  # noqa: E731
        best[k] = grid[climb_index(len(grid), grid.index(best[k]), at)]
    return best[0], best[1]


def main(argv=None) -> None:
    from . import tasks as task_data
    from .__main__ import RESULTS, open_set
    from .methods import PeftPeers
    from .train import SETS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.module_lambda", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="smollm2", choices=[*SETS, "smollm2"])
    parser.add_argument("--labels", default="peft:ties_svd,mtc[tsv],tsv+budget16")
    parser.add_argument("--versus", default="peft:ties_svd", help="the peer row every result is compared with")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if not (RESULTS / f"{args.set}.json").is_file():
        parser.error(f"no results/{args.set}.json: run `python -m benchmarks.quality --set {args.set}` first")
    result = load_result(json.loads((RESULTS / f"{args.set}.json").read_text()))
    rows = {r.label: r for r in result.rows if r.correct}
    labels = args.labels.split(",")
    if missing := [x for x in [*labels, args.versus] if x not in rows]:
        parser.error(f"not scored in results/{args.set}.json: {', '.join(missing)} (labels there: {', '.join(rows)})")
    evaluator, dirs = open_set(args.set, task_data.load())
    names = list(evaluator.tasks)
    factors = load_factors([dirs[t] for t in names])
    own = {t: {m: fs[i] for m, fs in factors.items()} for i, t in enumerate(names)}
    individual_val = {t: evaluator.scores(own[t], "validation", only=[t])[t] for t in names}
    candidates = package_candidates(factors, [1.0] * len(names)) + PeftPeers(evaluator.base_model,
                                                                             [dirs[t] for t in names]).candidates()
    candidates = {c.label: c for c in candidates}
    out = RESULTS / f"{args.set}-module-lambda.json"
    found = json.loads(out.read_text()) if out.is_file() else {}

    for label in labels:
        row, c = rows[label], candidates[label]
        shared = row.chosen["lambda"]
        merged = c.merge({**c.fixed, **row.chosen, "lambda": 1.0}).deltas
        cache = {}

        def score(la, lm):
            if (la, lm) not in cache:
                acc = evaluator.scores(by_module_type(merged, la, lm), "validation")
                cache[la, lm] = mean(normalize(acc, individual_val).values())
                print(f"  {label} λ_attn {la} λ_mlp {lm}: validation {cache[la, lm]:.3f}", flush=True)
            return cache[la, lm]

        best = climb(score, (shared, shared))
        correct = evaluator.correct(by_module_type(merged, *best), "test") if best != (shared, shared) else \
            {t: stats.unpack(row.correct[t]) for t in names}
        norm = normalize(accuracies(correct), result.individual)
        versus = {}
        for other in (label, args.versus):  # each at its shared λ, then the peer with its own λ per module type
            b = {t: stats.unpack(rows[other].correct[t]) for t in names}
            versus[other] = str(stats.paired_bootstrap(correct, b, result.individual))
        if args.versus in found and label != args.versus:
            b = {t: stats.unpack(found[args.versus]["correct"][t]) for t in names}
            versus[args.versus + " per type"] = str(stats.paired_bootstrap(correct, b, result.individual))
        found[label] = {"shared_lambda": shared, "shared_validation": score(shared, shared), "shared_test": row.mean,
                        "lambda_attention": best[0], "lambda_mlp": best[1], "validation": score(*best),
                        "test": mean(norm.values()), "worst": min(norm.values()), "versus": versus,
                        "evaluated": len(cache), "correct": {t: stats.pack(c) for t, c in correct.items()}}
        print(f"{label}: " + str({k: v for k, v in found[label].items() if k != "correct"}), flush=True)
        out.write_text(json.dumps(found, indent=1) + "\n")
    publish(args.set, found, args.versus)


def publish(set_name: str, found: dict, versus: str) -> None:
    from ..docs import write_section

    attention = "self_attn" if set_name == "smollm2" else "attention"
    lines = [f"### A λ per module type, adapter set `{set_name}` (`python -m benchmarks.quality.module_lambda "
             f"--set {set_name}`)", "",
             "λ_attn (q/k/v/o) and λ_mlp hill-climbed on validation from the shared λ of the set's table, scored "
             f"once on test; a recipe writes it as `lambda: [{{filter: {attention}, value: λ_attn}}, {{value: λ_mlp}}]`. "
             f"PEFT's merge gets the same search (its merged lora_B scaled per module type). Δ: paired bootstrap, 95%.",
             "", f"| merge | shared λ: validation / test | λ_attn, λ_mlp | validation | test | worst | Δ vs shared λ "
             f"| Δ vs {versus}, shared λ | Δ vs {versus}, λ per type |", "|---|---|---|---|---|---|---|---|---|"]
    for label, f in found.items():
        lines.append(f"| {label} | λ={f['shared_lambda']:g}: {f['shared_validation']:.3f} / {f['shared_test']:.3f} | "
                     f"{f['lambda_attention']:g}, {f['lambda_mlp']:g} | {f['validation']:.3f} | **{f['test']:.3f}** | "
                     f"{f['worst']:.3f} | {f['versus'][label]} | {f['versus'][versus]} | "
                     f"{f['versus'].get(versus + ' per type', '–')} |")
    write_section(f"module-lambda-{set_name}", "\n".join(lines))


if __name__ == "__main__":
    main()
