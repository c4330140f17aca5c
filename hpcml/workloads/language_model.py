"""Next-byte prediction: the task of the transformer LM workload (hpcml.compute.tasks has the protocol)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F


class LanguageModeling:
    """Cross-entropy of every position's prediction of the next token. Evaluation reports the held-out loss,
    its perplexity and bits per byte, beside the unigram perplexity of the same text: what the best model
    that ignores context could reach, the bar a language model must get well under."""

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size

    def training_step(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def evaluate(self, model: torch.nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        total, tokens = 0.0, 0
        counts = torch.zeros(self.vocab_size, dtype=torch.float64)
        for inputs, targets in batches:
            logits = model(inputs)
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"))
            tokens += targets.numel()
            counts += torch.bincount(targets.flatten().cpu(), minlength=self.vocab_size).double()
        loss = total / tokens
        frequencies = counts[counts > 0] / tokens
        unigram_entropy = float(-(frequencies * frequencies.log()).sum())
        return {
            "val_loss": loss,
            "val_perplexity": math.exp(loss),
            "val_bits_per_byte": loss / math.log(2),
            "val_unigram_perplexity": math.exp(unigram_entropy),
        }
