"""Evaluation: perplexity on a token stream and GSM8K exact-match accuracy.

Perplexity: the stream is cut into consecutive, non-overlapping windows of `context` tokens
(stride = context); every token after the first of each window is predicted from the tokens before
it in that window; ppl = exp(mean negative log-likelihood over all predicted tokens).
`max_windows` evaluates only the first windows (documented next to every reported number).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import GSM8K_PROMPT, read_jsonl

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, context: int = 512, max_windows: int | None = None,
               batch_size: int = 4, show_progress: bool = True) -> float:
    """Perplexity of `model` on the 1-D `tokens` (see the module docstring for the protocol)."""
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    n_windows = tokens.numel() // context
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {context}")
    windows = tokens[: n_windows * context].reshape(n_windows, context)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not show_progress):
        batch = windows[i:i + batch_size].to(device)  # (B, T)
        logits = model(input_ids=batch).logits.float()  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


def extract_answer(text: str) -> str | None:
    """The number after '####' if present, else the last number in `text` (commas removed)."""
    tail = text.split("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    chosen = numbers[0] if "####" in text else numbers[-1]
    return chosen.replace(",", "").rstrip(".")


@torch.no_grad()
def gsm8k_accuracy(model: nn.Module, tokenizer, path: str, limit: int = 50, max_new_tokens: int = 256,
                   show_progress: bool = True) -> dict:
    """Greedy GSM8K exact match on the first `limit` problems of a JSONL file.

    The prompt is ``Question: ...\\nAnswer:``; the prediction is the number after '####' in the
    generation (else its last number), compared to the number after '####' in the reference.
    """
    rows = read_jsonl(path)[:limit]
    if not rows:
        raise ValueError(f"{path} holds no problems")
    device = next(model.parameters()).device
    correct = 0
    for row in tqdm(rows, desc="gsm8k", disable=not show_progress):
        ids = tokenizer(GSM8K_PROMPT.format(question=row["question"]), return_tensors="pt").input_ids.to(device)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        text = text.split("Question:", 1)[0]  # stop at a hallucinated next problem
        correct += int(extract_answer(text) == extract_answer(row["answer"]))
    return {"accuracy": correct / len(rows), "correct": correct, "total": len(rows)}
