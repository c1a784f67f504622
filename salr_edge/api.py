"""The in-place entry point `compress_`, its handler registry, and `unload`."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .modules.sparse_lowrank_linear import SparseLowRankLinear

_HANDLERS: dict[type, Callable[..., nn.Module]] = {}


def register_handler(config_type: type) -> Callable:
    """Decorator: register the function that applies configs of `config_type`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _HANDLERS[config_type] = fn
        return fn

    return wrap


def compress_(model: nn.Module, config: Any, **kwargs: Any) -> nn.Module:
    """Modifies `model` in place: compress its targeted linear layers as `config` says.

    Args:
        model: a transformers causal LM (or any module with `nn.Linear` layers).
        config: `SALRConfig`, `SALAADConfig` (or another registered config type).
        **kwargs: handler-specific data, e.g. `calib_data` (an iterable of input-id tensors, for
            Wanda), `train_data`/`train_config`/`budget` (SALAAD) or `show_progress`.

    Returns:
        The same model object.
    """
    from .algorithms import salaad, salr  # noqa: F401  (register the SALAAD and SALR handlers)

    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"no compression handler for {type(config).__name__}; known: "
                        f"{sorted(t.__name__ for t in _HANDLERS)}")
    return handler(model, config, **kwargs)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is."""
    parent, child = _parent(model, name)
    setattr(parent, child, new)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Modifies `model` in place: replace every `SparseLowRankLinear` by a plain `nn.Linear`.

    Args:
        merge: fold the adapters into the weight first (else they are dropped).
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLowRankLinear):
            if merge:
                module.merge()
            replace_module(model, name, module.base_layer)
    model.__dict__.pop("salr_metadata", None)
    return model
