"""Model specs from YAML (a file, a string or a mapping): see :func:`load_model_spec`. Every bad
input is one ConfigError naming the source, the tensor and the key. Pure: no processes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple, Union

from ...config import read_yaml
from ...errors import ConfigError, allowed, did_you_mean, reject_unknown_keys
from .model import (Block, Experts, LayerRef, ModelSpec, TensorSpec, head_blocks, parts_blocks, qkv_blocks,
                    qkv_interleaved_blocks)
from .synthetic import llama_like

_TENSOR_KEYS = ("name", "shape", "dtype", "tp_dim", "layer", "fused", "experts", "vocab")
_MODEL_KEYS = ("name", "num_layers", "dtype", "tensors", "synthetic")
_FUSED_KINDS = ("qkv", "qkv_interleaved", "heads", "parts")
_HEADS_KEYS = ("heads", "kv_heads", "head_dim")
_EXPERTS_KEYS = ("num", "dim", "index")
_PARTS_KEYS = ("sizes", "unit", "names")
LAYER_PLACEHOLDER = "{layer}"
EXPERT_PLACEHOLDER = "{expert}"


def load_model_spec(obj: Union[str, "os.PathLike[str]", Mapping[str, Any]], source: Optional[str] = None) -> ModelSpec:
    """A ModelSpec from a YAML file path, a YAML string or a mapping::

        name: tiny
        num_layers: 2
        dtype: bfloat16                  # default for tensors without one
        tensors:
          - {name: embed.weight, shape: [1000, 64], tp_dim: 0, layer: embedding}
          - name: "layers.{layer}.attn.qkv.weight"   # one tensor per layer
            shape: [128, 64]
            tp_dim: 0
            fused: {qkv: {heads: 4, kv_heads: 2, head_dim: 16}}
          - name: "layers.{layer}.mlp.gate_up.weight"
            shape: [256, 64]
            tp_dim: 0
            fused: {parts: {sizes: [128, 128], names: [gate, up]}}   # roles a name map splits by
          - {name: "layers.{layer}.mlp.down.weight", shape: [64, 128], tp_dim: 1}
          - {name: norm.weight, shape: [64], layer: head}
          - {name: lm_head.weight, shape: [1000, 64], tp_dim: 0, layer: head}

    or ``synthetic: {hidden: ..., layers: ..., ...}`` (the arguments of :func:`llama_like`).
    A name containing ``{layer}`` is repeated for every layer. Raises ConfigError with the
    source, the tensor and the key for every bad input.
    """
    if isinstance(obj, Mapping):
        return model_spec_from_dict(obj, source or "<model spec>")
    data, source = read_yaml(obj, "model spec", source)
    return model_spec_from_dict(data, source)


def model_spec_from_dict(data: Any, source: str = "<model spec>") -> ModelSpec:
    """Validate a mapping (as YAML gives it) into a ModelSpec; see :func:`load_model_spec`."""
    where = f"{source}: "
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}a model spec must be a mapping with 'tensors:' (or 'synthetic:'), "
                          f"got {type(data).__name__}")
    reject_unknown_keys(data, _MODEL_KEYS, "", where)
    name = str(data.get("name", Path(source).stem if source.endswith((".yaml", ".yml")) else "model"))
    if "synthetic" in data:
        if "tensors" in data:
            raise ConfigError(f"{where}give either 'tensors:' or 'synthetic:', not both")
        options = data["synthetic"] or {}
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where}synthetic must be a mapping of llama_like options, got {options!r}")
        try:
            return llama_like(**{str(k): v for k, v in options.items()}, name=name)
        except TypeError as exc:
            raise ConfigError(f"{where}synthetic: {exc}") from None
    tensors_data = data.get("tensors")
    if not isinstance(tensors_data, list) or not tensors_data:
        raise ConfigError(f"{where}tensors must be a non-empty list of tensor entries, got {tensors_data!r}")
    num_layers = data.get("num_layers")
    default_dtype = data.get("dtype", "float32")
    tensors: List[TensorSpec] = []
    for index, entry in enumerate(tensors_data):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}tensors[{index}] must be a mapping with name and shape, got {entry!r}")
        reject_unknown_keys(entry, _TENSOR_KEYS, f"tensors[{index}].", where)
        for key in ("name", "shape"):
            if key not in entry:
                raise ConfigError(f"{where}tensors[{index}]: missing {key!r}")
        raw_name = entry["name"]
        if not isinstance(raw_name, str):
            raise ConfigError(f"{where}tensors[{index}].name must be a string, got {raw_name!r}")
        tp_dim = entry.get("tp_dim")
        shape = entry["shape"]
        at = f"{where}tensor {raw_name!r}: "
        blocks = _fused_blocks(entry.get("fused"), at)
        per_expert = _expert_entries(entry.get("experts"), raw_name, at)
        if LAYER_PLACEHOLDER in raw_name:
            if "layer" in entry:
                raise ConfigError(f"{at}a name with {{layer}} is repeated per layer; drop its 'layer:' key")
            if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
                raise ConfigError(f"{where}tensor {raw_name!r} uses {{layer}}: set num_layers (a positive "
                                  "integer) at the top of the spec")
            layers: List[LayerRef] = list(range(num_layers))
        else:
            if "layer" not in entry:
                raise ConfigError(f"{at}missing 'layer' (an index, 'embedding' or 'head'; or put {{layer}} in "
                                  "the name to repeat it per layer)")
            layers = [entry["layer"]]
        for layer in layers:
            for expert_name, experts in per_expert:
                tensor_name = expert_name.replace(LAYER_PLACEHOLDER, str(layer))
                tensors.append(TensorSpec.create(tensor_name, shape, entry.get("dtype", default_dtype), tp_dim,
                                                 layer, blocks, where, experts, entry.get("vocab", False)))
    return ModelSpec.create(tensors, num_layers, name, where)


def _expert_entries(value: Any, raw_name: str, at: str) -> List[Tuple[str, Optional[Experts]]]:
    """``experts: {num, dim}`` (grouped) / ``{num, index}`` / ``{num}`` with ``{expert}`` in the name
    (one tensor per expert) → ``[(name, Experts)]``; no ``experts:`` → ``[(name, None)]``."""
    if value is None:
        if EXPERT_PLACEHOLDER in raw_name:
            raise ConfigError(f"{at}a name with {{expert}} needs 'experts: {{num: N}}'")
        return [(raw_name, None)]
    if not isinstance(value, Mapping) or "num" not in value:
        raise ConfigError(f"{at}experts must be a mapping with 'num' and one of 'dim' / 'index' (or {{expert}} "
                          f"in the name), got {value!r}")
    reject_unknown_keys(value, _EXPERTS_KEYS, "experts.", at)
    num = value["num"]
    if EXPERT_PLACEHOLDER in raw_name:
        if "dim" in value or "index" in value:
            raise ConfigError(f"{at}a name with {{expert}} is repeated per expert; drop experts.dim / index")
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ConfigError(f"{at}experts.num must be a positive integer, got {num!r}")
        return [(raw_name.replace(EXPERT_PLACEHOLDER, str(e)), Experts(num, index=e)) for e in range(num)]
    return [(raw_name, Experts(num, value.get("dim"), value.get("index")))]


def _fused_blocks(value: Any, at: str) -> Optional[Tuple[Block, ...]]:
    if value is None:
        return None
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ConfigError(f"{at}fused must be one of {{qkv | qkv_interleaved | heads: {{heads, kv_heads, "
                          f"head_dim}}}} or {{parts: [sizes]}}, got {value!r}")
    (kind, options), = value.items()
    if kind in ("qkv", "qkv_interleaved", "heads"):
        keys = _HEADS_KEYS + (("role",) if kind == "heads" else ())
        if not isinstance(options, Mapping) or not set(_HEADS_KEYS) <= set(options) <= set(keys):
            raise ConfigError(f"{at}fused.{kind} needs {allowed(_HEADS_KEYS)}"
                              f"{' (and optionally role: q or kv)' if kind == 'heads' else ''}, got {options!r}")
        try:
            if kind == "heads":
                return head_blocks(options["heads"], options["kv_heads"], options["head_dim"],
                                   options.get("role", "q"))
            build = qkv_blocks if kind == "qkv" else qkv_interleaved_blocks
            return build(options["heads"], options["kv_heads"], options["head_dim"])
        except ConfigError as exc:
            raise ConfigError(f"{at}{exc}") from None
    if kind == "parts":
        return _parts_blocks(options, at)
    raise ConfigError(f"{at}fused: unknown layout {kind!r}{did_you_mean(str(kind), _FUSED_KINDS)}; "
                      f"allowed: {allowed(_FUSED_KINDS)}")


def _parts_blocks(options: Any, at: str) -> Tuple[Block, ...]:
    """``fused: {parts: [sizes]}`` or ``{parts: {sizes: [...], unit: U, names: [...]}}``: the part
    names are the roles a name map splits by (default ``part0``, ``part1``, …)."""
    if isinstance(options, Mapping):
        reject_unknown_keys(options, _PARTS_KEYS, "fused.parts.", at)
        sizes, unit, names = options.get("sizes"), options.get("unit", 1), options.get("names", ())
    else:
        sizes, unit, names = options, 1, ()
    if not isinstance(sizes, list) or not sizes or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ConfigError(f"{at}fused.parts must be a list of positive sizes, got {sizes!r}")
    if isinstance(unit, bool) or not isinstance(unit, int) or unit < 1:
        raise ConfigError(f"{at}fused.parts.unit must be a positive integer, got {unit!r}")
    if names and (not isinstance(names, list) or len(names) != len(sizes) or len(set(names)) != len(names)
                  or not all(isinstance(n, str) and n for n in names)):
        raise ConfigError(f"{at}fused.parts.names must be {len(sizes)} distinct names, one per size "
                          f"(e.g. [gate, up]), got {names!r}")
    return parts_blocks(sizes, unit, names)
