"""Text and instruction data for calibration, fine-tuning and evaluation.

Plain text (e.g. WikiText-2) is tokenized as one stream. JSONL instruction data (GSM8K's
``{"question", "answer"}``) is rendered as ``Question: ...\\nAnswer: ...`` + EOS per example and
concatenated into one stream as well (packing), so both feed the same window sampler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

GSM8K_PROMPT = "Question: {question}\nAnswer:"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    return rows


def load_token_stream(path: str | os.PathLike, tokenizer, max_chars: int | None = None) -> torch.Tensor:
    """Tokenize a .txt file (as one text) or a .jsonl file (question/answer or text rows) into 1-D ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        eos = tokenizer.eos_token or ""
        parts = []
        for row in read_jsonl(path):
            if "question" in row and "answer" in row:
                parts.append(GSM8K_PROMPT.format(question=row["question"]) + " " + row["answer"] + eos)
            elif "text" in row:
                parts.append(row["text"] + eos)
            else:
                raise ValueError(f"{path}: rows need 'question'+'answer' or 'text' fields, got {sorted(row)}")
        text = "\n".join(parts)
    else:
        text = path.read_text(encoding="utf-8")
    if max_chars is not None:
        text = text[:max_chars]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < 2:
        raise ValueError(f"{path} holds fewer than 2 tokens")
    return ids


def sample_windows(tokens: torch.Tensor, seq_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random windows [count, seq_len] from a 1-D token stream."""
    if tokens.numel() <= seq_len:
        raise ValueError(f"the data has {tokens.numel()} tokens, fewer than seq_len={seq_len} + 1")
    starts = torch.randint(0, tokens.numel() - seq_len, (count,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def calibration_batches(tokens: torch.Tensor, seq_len: int = 512, count: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Deterministic calibration windows (each [1, seq_len]) for Wanda."""
    g = torch.Generator().manual_seed(seed)
    return list(sample_windows(tokens, seq_len, count, g).unsqueeze(1))
