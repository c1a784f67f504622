"""Result records of `salr-bench`: one `BenchRecord` per measured quantity, one `RunRecord` per run."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1


@dataclass
class BenchRecord:
    """Summary of repeated timings of one quantity of one model (seconds unless `unit` says else)."""

    model: str
    metric: str
    unit: str
    p20: float
    p50: float
    p80: float
    min: float
    max: float
    n: int

    @classmethod
    def from_samples(cls, model: str, metric: str, unit: str, samples: list[float]) -> "BenchRecord":
        if not samples:
            raise ValueError(f"no samples for {model} {metric}")
        a = np.asarray(samples, dtype=np.float64)
        return cls(model, metric, unit, float(np.percentile(a, 20)), float(np.median(a)), float(np.percentile(a, 80)),
                   float(a.min()), float(a.max()), int(a.size))


@dataclass
class ModelSummary:
    """Everything measured about one model in one run."""

    name: str
    path: str
    file_bytes: int
    uses_salr_ops: bool
    load_seconds: float | None = None
    peak_rss_mb: float | None = None
    rss_delta_mb: float | None = None
    gpu_memory_mb: float | None = None
    prefill_seconds: float | None = None
    ttft_seconds: float | None = None
    decode_token_seconds: float | None = None
    decode_tokens_per_second: float | None = None
    perplexity: float | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    greedy_tokens: list[int] = field(default_factory=list)
    op_profile: dict[str, float] | None = None


@dataclass
class RunRecord:
    """One `salr-bench` run: where, with what, and the figures."""

    device: dict[str, Any]
    settings: dict[str, Any]
    models: list[ModelSummary]
    records: list[BenchRecord]
    ort_version: str
    commit: str
    salr_edge_version: str
    timestamp: str
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_description(provider: str) -> dict[str, Any]:
    """CPU model, cores, ISA flags of interest, and the GPU name when one is used."""
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(), "provider": provider}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
        info["isa"] = sorted({f for f in ("avx2", "fma", "f16c", "avx512f", "asimd", "fphp", "asimddp")
                              if f" {f}" in flags})
    import os

    info["cores"] = os.cpu_count()
    if provider == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)
            info["gpu"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["gpu"] = "unknown"
    return info


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
