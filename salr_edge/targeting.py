"""Choose the layers to compress with PEFT's `target_modules`/`exclude_modules` semantics.

A string is a full-match regex over the module name; a list matches an exact name or a ``.suffix``;
"all-linear" matches every `nn.Linear` except the output embedding.
"""

from __future__ import annotations

import re

from torch import nn

from .config import TargetSpec


def _matches(name: str, spec: TargetSpec) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _output_embedding_names(model: nn.Module) -> set[str]:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return {name for name, module in model.named_modules() if out is not None and module is out}


def find_target_linears(model: nn.Module, target_modules: TargetSpec,
                        exclude_modules: TargetSpec = None) -> list[str]:
    """Names of the `nn.Linear` modules selected by the targeting rules, in model order.

    Raises:
        ValueError: nothing matched (naming the patterns).
    """
    heads = _output_embedding_names(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if target_modules == "all-linear":
            hit = name not in heads and name != "lm_head"
        else:
            hit = _matches(name, target_modules)
        if hit and not _matches(name, exclude_modules):
            names.append(name)
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no nn.Linear "
            f"in the base model")
    return names
