"""The causal-LM side of the quality benchmark (benchmarks/quality/causal.py, train_causal.py) on a tiny random
Llama and a character tokenizer: the cached, left-padded scoring chooses what a plain forward per option chooses,
and training touches only the answer tokens."""

from __future__ import annotations

import pytest
import torch

from benchmarks.quality.causal import CausalEvaluator, ChatFormat, Prompt
from benchmarks.quality.tasks import Task
from benchmarks.quality.train_causal import batch_tensors
from helpers import tiny_llama

SPECIALS = ["<|im_start|>", "<|im_end|>"]


class CharTokenizer:
    """One token per character (the two chat markers are single tokens), ids below 64."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids, i = [], 0
        while i < len(text):
            for k, special in enumerate(SPECIALS):
                if text.startswith(special, i):
                    ids.append(1 + k)
                    i += len(special)
                    break
            else:
                ids.append(3 + ord(text[i]) % 61)
                i += 1
        return {"input_ids": ids}


PROMPTS = {"t": Prompt("pick:", ("ab", "ac", "b"))}  # "ab"/"ac" share their first token: the second pass decides


def task(n: int = 13) -> Task:
    items = [(("x" * (1 + i % 5)) + str(i), i % 3) for i in range(n)]
    return Task("t", ["one", "two", "three"], items, items, items)


@pytest.fixture(scope="module")
def evaluator():
    model = tiny_llama(hidden=16, heads=2, vocab=64, layers=2, seed=3).eval()
    return CausalEvaluator(model, CharTokenizer(), {"t": task()}, batch_size=4, prompts=PROMPTS)


def plain_choice(model, fmt: ChatFormat, text: str) -> tuple[int, torch.Tensor]:
    """Σ log p(answer tokens | prompt) per option, one full unpadded forward per option."""
    scores = []
    for answer in PROMPTS["t"].answers:
        prompt = fmt.prefix("t") + fmt.suffix(text)
        ans = fmt._ids(answer)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([prompt + ans])).logits[0].log_softmax(-1)
        scores.append(sum(float(logp[len(prompt) - 1 + j, a]) for j, a in enumerate(ans)))
    return max(range(len(scores)), key=scores.__getitem__), torch.tensor(scores)


def test_cached_left_padded_scoring_equals_a_plain_forward(evaluator):
    """Every option's log-likelihood (texts of 2-6 tokens, batches of 4: padding in every batch)."""
    texts = [t for t, _ in task().test]
    got = evaluator.option_scores("t", texts)
    want = torch.stack([plain_choice(evaluator.base_model, evaluator.format, t)[1] for t in texts])
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
    assert evaluator.predict("t", texts).tolist() == want.argmax(-1).tolist()


def test_scores_are_per_item_and_deltas_are_restored(evaluator):
    module = "model.layers.0.self_attn.q_proj"
    before = evaluator.base_model.get_submodule(module).weight.clone()
    delta = {module: torch.randn_like(before)}
    correct = evaluator.correct(delta, "test")
    assert correct["t"].dtype == torch.bool and correct["t"].numel() == 13
    assert evaluator.scores(delta, "test")["t"] == pytest.approx(correct["t"].float().mean().item())
    assert torch.equal(evaluator.base_model.get_submodule(module).weight, before)


def test_training_batch_supervises_only_the_answer():
    fmt = ChatFormat(CharTokenizer(), PROMPTS)
    items = [("xyz", 0), ("q", 2)]
    ids, mask, labels = batch_tensors(fmt, "t", items)
    for row, (text, label) in enumerate(items):
        prompt = fmt.prefix("t") + fmt.suffix(text)
        answer = fmt.answer("t", label)
        n = len(prompt) + len(answer)
        assert ids[row, :n].tolist() == prompt + answer and mask[row].sum() == n
        assert labels[row, len(prompt):n].tolist() == answer
        assert (labels[row, :len(prompt)] == -100).all() and (labels[row, n:] == -100).all()
