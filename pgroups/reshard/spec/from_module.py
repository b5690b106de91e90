"""Model specs from a ``torch.nn.Module``: its parameters' names, shapes and dtypes, laid out by a
few :class:`Rule` s. Pure: no processes."""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

import attrs
import torch

from ...errors import ConfigError
from .model import Block, LayerRef, ModelSpec, TensorSpec


@attrs.frozen
class Rule:
    """How the parameters whose name matches ``pattern`` (``re.search``) are laid out.

    ``tp_dim`` None means replicated; ``layer`` overrides the layer found by the module's
    layer pattern (use ``"embedding"`` / ``"head"`` for tensors outside the layers); ``blocks``
    gives a fused layout (:func:`qkv_blocks`, :func:`parts_blocks`).
    """

    pattern: str
    tp_dim: Optional[int] = None
    layer: Optional[LayerRef] = None
    blocks: Optional[Tuple[Block, ...]] = None


#: finds the layer index in names such as ``model.layers.3.mlp.up.weight`` or ``h.3.attn.w``
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\."


def spec_from_module(module: torch.nn.Module, rules: Sequence[Rule],
                     layer_pattern: str = DEFAULT_LAYER_PATTERN, name: str = "model",
                     include_buffers: bool = False) -> ModelSpec:
    """A ModelSpec for the parameters (and, optionally, persistent buffers) of ``module``.

    The first rule whose pattern matches a name decides its layout; a name that matches no rule
    is replicated. The layer comes from the rule, else from ``layer_pattern``'s first group.
    Shapes and dtypes are the module's own (the *full* model). Raises ConfigError naming a
    tensor whose layer cannot be found.
    """
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    layer_re = re.compile(layer_pattern)
    named = list(module.named_parameters())
    if include_buffers:
        named += list(module.named_buffers())
    tensors = []
    for tensor_name, tensor in named:
        rule = next((r for rx, r in compiled if rx.search(tensor_name)), None)
        layer = rule.layer if rule is not None and rule.layer is not None else None
        if layer is None:
            match = layer_re.search(tensor_name)
            if match is None:
                raise ConfigError(f"tensor {tensor_name!r}: no layer index found by pattern {layer_pattern!r} "
                                  "and no rule gives one; add Rule(pattern, layer='embedding' or 'head')")
            layer = int(match.group(1))
        tensors.append(TensorSpec.create(tensor_name, tuple(tensor.shape), tensor.dtype,
                                         rule.tp_dim if rule else None, layer,
                                         rule.blocks if rule else None))
    return ModelSpec.create(tensors, name=name)
