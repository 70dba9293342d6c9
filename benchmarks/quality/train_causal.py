"""Train one rank-16 LoRA per task on SmolLM2-135M-Instruct (deterministic, CPU), saved as a float16 PEFT adapter.

Supervised fine-tuning on the chat turns of ``causal.py``: cross-entropy on the answer tokens (answer word and
``<|im_end|>``) only; LoRA r = 16, alpha = 16 on q/k/v/o/gate/up/down of all 30 layers; AdamW, 5 warm-up steps
then linear decay, batch 16, seed 0. Existing adapters are kept (cache).

    python -m benchmarks.quality.train_causal [--force] [--steps 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import tasks as task_data
from .causal import HUB_NAME, TARGET_MODULES, CausalEvaluator, ChatFormat, load_smollm2
from .train import optimizer, save_adapter

ADAPTER_DIR = Path(__file__).resolve().parents[2] / "examples" / "smollm2-wordnet8" / "adapters"
RANK, ALPHA, STEPS, LR, BATCH, WARMUP = 16, 16.0, 50, 2e-3, 16, 5


def batch_tensors(fmt: ChatFormat, task: str, items: list[tuple[str, int]]):
    """(input ids, attention mask, labels) right-padded; labels are -100 except on the answer tokens."""
    rows = []
    for text, label in items:
        prompt, answer = fmt.prefix(task) + fmt.suffix(text), fmt.answer(task, label)
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return ids, mask, labels


def train_adapter(model, fmt: ChatFormat, task, *, steps: int = STEPS, lr: float = LR, seed: int = 0):
    """A PEFT LoRA fine-tuned on ``task.train`` (the base model is wrapped in place; unload() restores it)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    opt, sched = optimizer(peft_model, lr, steps, WARMUP)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(task.train), generator=gen)
    for step in range(steps):
        idx = order[(step * BATCH) % len(order):][:BATCH]
        ids, mask, labels = batch_tensors(fmt, task.name, [task.train[i] for i in idx])
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return peft_model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.train_causal", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="retrain adapters that already exist")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the committed adapters used 2)")
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all eight)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = task_data.load()
    model, tokenizer = load_smollm2()
    fmt = ChatFormat(tokenizer)
    log_file = ADAPTER_DIR / "training.json"
    ADAPTER_DIR.mkdir(parents=True, exist_ok=True)
    log = json.loads(log_file.read_text()) if log_file.is_file() else {}
    for name in [t for t in args.tasks.split(",") if t] or tasks:
        target = ADAPTER_DIR / name
        if (target / "adapter_model.safetensors").is_file() and not args.force:
            print(f"{name}: cached")
            continue
        t0 = time.perf_counter()
        peft_model = train_adapter(model, fmt, tasks[name], steps=args.steps)
        seconds = time.perf_counter() - t0
        save_adapter(peft_model, target, HUB_NAME)
        val = CausalEvaluator(peft_model, tokenizer, {name: tasks[name]}, validation_limit=100)
        accuracy = val.accuracy(name, val.examples(name, "validation"))
        model = peft_model.unload()  # the base weights, unchanged
        log[name] = {"rank": RANK, "alpha": ALPHA, "steps": args.steps, "lr": LR, "batch": BATCH,
                     "threads": args.threads, "train_seconds": round(seconds, 1),
                     "validation_accuracy_fp32_first100": round(accuracy, 4)}
        log_file.write_text(json.dumps(log, indent=2) + "\n")
        print(f"{name}: {seconds:.0f}s  val acc (first 100) {accuracy:.3f}", flush=True)


if __name__ == "__main__":
    main()
