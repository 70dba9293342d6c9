"""Train one PEFT LoRA per task on the shared base model (deterministic, CPU) and save it as a PEFT adapter.

Loss: cross-entropy of ``20 · cos(embed(x), head)`` against the frozen label-name head; AdamW lr 2e-3, 10-step
warmup then linear decay, batch 32, seed 0. Adapters are saved in float16 with
``base_model_name_or_path`` set to the Hub name (never a local path). Existing adapters are kept (cache).

    python -m benchmarks.quality.train [--set main|mixed|rslora|all] [--force]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import tasks as task_data
from .model import HEAD_SCALE, HUB_NAME, TARGET_MODULES, Encoder, accuracy, label_heads, load_minilm

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "minilm-wordnet8"


@dataclass(frozen=True)
class AdapterSet:
    """A collection of adapters, one per task: ranks cycle through ``ranks``; alpha = alpha_per_rank · r;
    ``schedule`` (steps, lr) per task in task order, else ``steps`` and ``lr`` for all."""

    directory: str
    ranks: tuple[int, ...]
    alpha_per_rank: float = 2.0
    rslora: bool = False
    steps: int = 60
    lr: float = 2e-3
    schedule: tuple[tuple[int, float], ...] | None = None

    def config(self, i: int) -> tuple[int, float]:
        r = self.ranks[i % len(self.ranks)]
        return r, self.alpha_per_rank * r

    def training(self, i: int) -> tuple[int, float]:
        return self.schedule[i] if self.schedule else (self.steps, self.lr)


SETS = {
    "main": AdapterSet("adapters", (16,)),
    # Real collections mix ranks; the variants train half the steps to keep the rebuild short.
    "mixed": AdapterSet("adapters-mixed", (4, 8, 16, 8), steps=30),
    # rsLoRA: scale alpha/sqrt(r) = 8/sqrt(8) ≈ 2.83 (plain LoRA above: alpha/r = 2).
    "rslora": AdapterSet("adapters-rslora", (8,), alpha_per_rank=1.0, rslora=True, steps=30),
    # Compress-then-Merge's regime: update norms that differ by more than 10x across tasks (steps × lr spread 100x).
    "hetero": AdapterSet("adapters-hetero", (16,), schedule=((80, 4e-3), (10, 3e-4), (40, 2e-3), (15, 5e-4),
                                                             (60, 3e-3), (10, 1e-4), (25, 1e-3), (15, 6e-4))),
}


def train_adapter(encoder: Encoder, task, head: torch.Tensor, *, rank: int, alpha: float, rslora: bool = False,
                  steps: int = 60, lr: float = 2e-3, batch_size: int = 32, warmup: int = 10, seed: int = 0):
    """Fine-tune a LoRA on ``task.train``; returns the PEFT model (base weights untouched: the model is copied)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, use_rslora=rslora, target_modules=TARGET_MODULES)
    model = get_peft_model(copy.deepcopy(encoder.model), config)
    model.train()
    opt, sched = optimizer(model, lr, steps, warmup)
    gen = torch.Generator().manual_seed(seed)
    texts = [t for t, _ in task.train]
    labels = torch.tensor([y for _, y in task.train])
    epochs = -(-steps * batch_size // len(texts))
    order = torch.cat([torch.randperm(len(texts), generator=gen) for _ in range(epochs)])
    for step in range(steps):
        idx = order[step * batch_size:(step + 1) * batch_size]
        emb = encoder.forward([texts[i] for i in idx], model=model)
        loss = torch.nn.functional.cross_entropy(HEAD_SCALE * emb @ head.T, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def optimizer(model, lr: float, steps: int, warmup: int):
    """AdamW over the trainable (LoRA) parameters; lr rises linearly for ``warmup`` steps, then decays to 0."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    return opt, sched


def save_adapter(model, directory: Path, hub_name: str = HUB_NAME) -> None:
    """PEFT's own save, then float16 tensors and a portable base_model_name_or_path."""
    model.save_pretrained(directory)
    weights = directory / "adapter_model.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}, weights)
    cfg_file = directory / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = hub_name
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (directory / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template


def train_set(set_name: str, *, force: bool = False, root: Path = EXAMPLE_DIR, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    spec = SETS[set_name]
    tasks = task_data.load()
    encoder = load_minilm()
    heads = label_heads(encoder, tasks)
    out = root / spec.directory
    log_file = out / "training.json"
    log = json.loads(log_file.read_text()) if log_file.is_file() else {}
    for i, (name, task) in enumerate(tasks.items()):
        target = out / name
        if (target / "adapter_model.safetensors").is_file() and not force:
            print(f"[{set_name}] {name}: cached")
            continue
        rank, alpha = spec.config(i)
        steps, lr = spec.training(i)
        t0 = time.perf_counter()
        model = train_adapter(encoder, task, heads[name], rank=rank, alpha=alpha, rslora=spec.rslora, steps=steps, lr=lr)
        seconds = time.perf_counter() - t0
        save_adapter(model, target)
        val = accuracy(Encoder(model, encoder.tokenizer), heads[name], task.validation)
        log[name] = {"rank": rank, "alpha": alpha, "use_rslora": spec.rslora, "steps": steps, "lr": lr,
                     "threads": threads,
                     "train_seconds": round(seconds, 1), "validation_accuracy_fp32": round(val, 4)}
        log_file.write_text(json.dumps(log, indent=2) + "\n")
        print(f"[{set_name}] {name}: r={rank} alpha={alpha} {seconds:.0f}s  val acc {val:.3f}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", choices=[*SETS, "all"], default="all", help="which adapter set to (re)build")
    parser.add_argument("--force", action="store_true", help="retrain adapters that already exist")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the committed adapters used 1)")
    args = parser.parse_args(argv)
    for name in SETS if args.set == "all" else [args.set]:
        train_set(name, force=args.force, threads=args.threads)


if __name__ == "__main__":
    main()
