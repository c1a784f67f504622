"""Render a `RunRecord` as JSON, a Markdown table and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from ..io_utils import atomic_file, atomic_write_text
from .records import RunRecord


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(run: RunRecord) -> str:
    s = run.settings
    lines = [
        f"Device: {run.device.get('cpu', '?')} ({run.device.get('cores')} cores, {run.device.get('provider')}), "
        f"ORT {run.ort_version}, commit {run.commit}, {run.timestamp}",
        f"Settings: threads {s['threads']}, batch {s['batch']}, prompt {s['prompt_len']}, generate {s['gen_len']}, "
        f"{s['reps']} reps (medians), models interleaved run by run.",
        "",
        "| model | file MB | load s | peak RSS MB | prefill ms | TTFT ms | decode ms/token | tokens/s | "
        "vs first | ppl | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = run.models[0].decode_tokens_per_second if run.models else None
    for m in run.models:
        speed = (m.decode_tokens_per_second / ref) if (ref and m.decode_tokens_per_second) else None
        gate = "ok" if m.gate.get("passed", True) else "FAIL"
        if "max_abs_diff" in m.gate:
            gate += f" ({m.gate['max_abs_diff']:.1e})"
        lines.append(
            f"| {m.name} | {m.file_bytes / 1e6:.1f} | {_fmt(m.load_seconds, '.2f')} | {_fmt(m.peak_rss_mb, '.0f')} | "
            f"{_fmt(m.prefill_seconds and m.prefill_seconds * 1e3, '.1f')} | "
            f"{_fmt(m.ttft_seconds and m.ttft_seconds * 1e3, '.1f')} | "
            f"{_fmt(m.decode_token_seconds and m.decode_token_seconds * 1e3, '.2f')} | "
            f"{_fmt(m.decode_tokens_per_second, '.1f')} | {_fmt(speed, '.2f')}x | {_fmt(m.perplexity, '.2f')} | {gate} |")
    profiled = [m for m in run.models if m.op_profile]
    if profiled:
        lines += ["", "Time per op type (ms, whole profiled run):", ""]
        for m in profiled:
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(m.op_profile.items())[:8])
            lines.append(f"- {m.name}: {top}")
    return "\n".join(lines) + "\n"


def plots(run: RunRecord, directory: Path) -> list[Path]:
    """tokens/s and bytes per model; prefill latency vs prompt length when a sweep was run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in run.models]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar(names, [m.decode_tokens_per_second or 0 for m in run.models], color="tab:blue")
    axes[0].set_ylabel("decode tokens/s")
    axes[1].bar(names, [m.file_bytes / 1e6 for m in run.models], color="tab:orange")
    axes[1].set_ylabel("model bytes (MB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{run.device.get('cpu', run.device.get('machine'))}, {run.settings['threads']} threads")
    fig.tight_layout()
    paths.append(_save(fig, directory / "tokens_and_bytes.png"))
    sweep = run.settings.get("prefill_sweep") or {}
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, points in sweep.items():
            lengths = sorted(int(k) for k in points)
            ax.plot(lengths, [points[str(k)] * 1e3 for k in lengths], marker="o", label=name)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("prefill latency (ms)")
        ax.legend()
        fig.tight_layout()
        paths.append(_save(fig, directory / "prefill_latency.png"))
    plt.close("all")
    return paths


def _save(fig, path: Path) -> Path:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def write_all(run: RunRecord, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "bench.json"
    atomic_write_text(json_path, json.dumps(run.to_dict(), indent=1))
    md_path = directory / "bench.md"
    atomic_write_text(md_path, markdown(run))
    return [json_path, md_path, *plots(run, directory)]
