"""Head-only baseline: does each adapter clearly beat the base model with a *trained* head?

On the frozen base embeddings e(x) a linear softmax head (W, b) is fitted per task (full-batch Adam on
cross-entropy, W initialised at 20 · the label-name head, so it starts at zero-shot). Its test accuracy is
compared with zero-shot and with the task's own adapter (which keeps the frozen label-name head).

    python -m benchmarks.quality.probe [--train-per-task 1000]      # writes results/probe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .model import HEAD_SCALE


def fit_linear_head(emb: torch.Tensor, labels: torch.Tensor, init: torch.Tensor, steps: int = 300,
                    lr: float = 1e-2, weight_decay: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    W = (HEAD_SCALE * init).clone().requires_grad_(True)
    b = torch.zeros(init.shape[0], requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(emb @ W.T + b, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return W.detach(), b.detach()


def head_only(evaluator, train_per_task: int = 1000) -> dict[str, dict[str, float]]:
    """Per task: zero-shot, trained-linear-head and (when given) adapter test accuracy."""
    out = {}
    for name, task in evaluator.tasks.items():
        train = task.train[:train_per_task]
        emb = evaluator.encoder.embed([t for t, _ in train])
        W, b = fit_linear_head(emb, torch.tensor([y for _, y in train]), evaluator.heads[name])
        test = evaluator.encoder.embed([t for t, _ in task.test])
        y = torch.tensor([y for _, y in task.test])
        out[name] = {"zero_shot": ((test @ evaluator.heads[name].T).argmax(-1) == y).float().mean().item(),
                     "head_only": ((test @ W.T + b).argmax(-1) == y).float().mean().item()}
    return out


def main(argv=None) -> None:
    from . import tasks as task_data
    from .evaluate import Evaluator
    from .model import load_minilm

    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-per-task", type=int, default=1000)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    scores = head_only(Evaluator(load_minilm(), task_data.load()), args.train_per_task)
    out = Path(__file__).resolve().parent / "results" / "probe.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"train_per_task": args.train_per_task, "scores": scores}, indent=1) + "\n")
    for name, s in scores.items():
        print(f"{name:9s} zero-shot {s['zero_shot']:.3f}  trained head {s['head_only']:.3f}")


if __name__ == "__main__":
    main()
