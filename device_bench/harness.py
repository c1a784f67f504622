"""Drive exported decoder models through ONNX Runtime: prefill, KV-cache decode, perplexity, timing.

Works on any model with the exporter's I/O contract: inputs `input_ids`, `attention_mask`,
`position_ids`, `past_key_values.{i}.key|value`; outputs `logits`, `present.{i}.key|value`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class DecoderIO:
    """The cache layout read from a session's inputs."""

    past_names: list[str]
    present_names: list[str]
    kv_heads: int
    head_dim: int
    kv_dtype: type

    @classmethod
    def from_session(cls, session) -> "DecoderIO":
        inputs = {i.name: i for i in session.get_inputs()}
        for name in ("input_ids", "attention_mask", "position_ids"):
            if name not in inputs:
                raise ValueError(f"the model has no {name!r} input: not a decoder exported by salr-export")
        past = sorted((n for n in inputs if n.startswith("past_key_values.")),
                      key=lambda n: (int(n.split(".")[1]), n.endswith("value")))
        if not past:
            raise ValueError("the model has no past_key_values inputs: it cannot decode with a KV cache")
        shape = inputs[past[0]].shape  # (batch, kv_heads, past, head_dim)
        if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
            raise ValueError(f"{past[0]} must have static kv_heads and head_dim, got shape {shape}")
        present = [n.replace("past_key_values.", "present.") for n in past]
        return cls(past, present, shape[1], shape[3], _NP_TYPES.get(inputs[past[0]].type, np.float32))


def run_step(session, io: DecoderIO, ids: np.ndarray, past: list[np.ndarray] | None, past_len: int):
    """One forward: ids [B, T] after `past_len` cached tokens. Returns (logits [B, T, V], presents)."""
    batch, length = ids.shape
    if past is None:
        past = [np.zeros((batch, io.kv_heads, 0, io.head_dim), dtype=io.kv_dtype) for _ in io.past_names]
    feed = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, past_len + length), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + length, dtype=np.int64), (batch, length)).copy(),
    }
    feed.update(zip(io.past_names, past))
    outputs = session.run(["logits", *io.present_names], feed)
    return outputs[0], outputs[1:]


def generate_timed(session, io: DecoderIO, prompt: np.ndarray, gen_len: int) -> dict:
    """Greedy generation of `gen_len` tokens after `prompt` [B, T], timing prefill and every decode step."""
    t0 = time.perf_counter()
    logits, past = run_step(session, io, prompt, None, 0)
    token = logits[:, -1].argmax(-1)  # (B,)
    t1 = time.perf_counter()
    tokens, steps = [token], []
    length = prompt.shape[1]
    for _ in range(gen_len - 1):
        s = time.perf_counter()
        logits, past = run_step(session, io, token[:, None], past, length)
        token = logits[:, -1].argmax(-1)
        steps.append(time.perf_counter() - s)
        tokens.append(token)
        length += 1
    return {"prefill": t1 - t0, "steps": steps, "tokens": np.stack(tokens, axis=1)}


def perplexity(session, io: DecoderIO, tokens: np.ndarray, context: int = 512, windows: int = 8) -> float:
    """Perplexity over the first `windows` non-overlapping windows of `context` tokens (as salr eval)."""
    n = min(windows, tokens.size // context)
    if n == 0:
        raise ValueError(f"{tokens.size} tokens are fewer than one window of {context}")
    nll, count = 0.0, 0
    for w in range(n):
        ids = tokens[w * context:(w + 1) * context][None]  # (1, T)
        logits, _ = run_step(session, io, ids, None, 0)
        z = logits[0, :-1].astype(np.float64)  # (T-1, V)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(context - 1), ids[0, 1:]].sum())
        count += context - 1
    return math.exp(nll / count)


def file_bytes(model_path: str | os.PathLike) -> int:
    """Bytes of the .onnx file plus every external-data file it references."""
    import onnx

    path = Path(model_path)
    proto = onnx.load(str(path), load_external_data=False)
    files = {path}
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sum(f.stat().st_size for f in files if f.is_file())


_PROBE = r"""
import json, resource, sys, time
from salr_edge.runtime import make_session
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
s = make_session(sys.argv[1], providers=json.loads(sys.argv[2]), threads=int(sys.argv[3]))
load = time.perf_counter() - t
sys.path.insert(0, sys.argv[4])
from salr_edge.device_bench.harness import DecoderIO, generate_timed
import numpy as np
io = DecoderIO.from_session(s)
generate_timed(s, io, np.arange(1, 17, dtype=np.int64)[None] % 100, 4)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"load_seconds": load, "peak_rss_mb": rss / 1024, "rss_delta_mb": (rss - rss0) / 1024}))
"""


def probe_memory(model_path: str, providers: list[str], threads: int) -> dict:
    """Load time and peak RSS of a fresh process that loads the model and runs a short generation.

    A separate process, so one model's memory does not hide inside another's peak.
    """
    out = subprocess.run([sys.executable, "-c", _PROBE, str(model_path), json.dumps(providers), str(threads),
                          str(Path(__file__).resolve().parent)],
                         capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"loading {model_path} in a fresh process failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile_ops(profile_file: str) -> dict[str, float]:
    """Total milliseconds per op type from an ORT profiling trace."""
    events = json.loads(Path(profile_file).read_text())
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event.get("dur", 0) / 1000.0
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
