"""What model state looks like, independent of any layout (see :mod:`.model` for the contract):
tensor specs and the model (:mod:`.model`), built from YAML (:mod:`.from_yaml`), from a
``torch.nn.Module`` (:mod:`.from_module`) or as a synthetic decoder (:mod:`.synthetic`). Pure: no
processes, no torch.distributed."""
from .from_module import DEFAULT_LAYER_PATTERN, Rule, spec_from_module
from .from_yaml import EXPERT_PLACEHOLDER, LAYER_PLACEHOLDER, load_model_spec, model_spec_from_dict
from .model import (DTYPES, EMBEDDING, HEAD, TIED, Block, Experts, Heads, LayerRef, ModelSpec, Piece, TensorSpec,
                    attention_heads, balanced_share, dtype_name, head_blocks, parse_dtype, parts_blocks, qkv_blocks,
                    qkv_interleaved_blocks)
from .synthetic import llama_like

__all__ = ["DEFAULT_LAYER_PATTERN", "DTYPES", "EMBEDDING", "EXPERT_PLACEHOLDER", "HEAD", "LAYER_PLACEHOLDER", "TIED",
           "Block", "Experts", "Heads", "LayerRef", "ModelSpec", "Piece", "Rule", "TensorSpec", "attention_heads",
           "balanced_share", "dtype_name", "head_blocks", "llama_like", "load_model_spec", "model_spec_from_dict",
           "parse_dtype", "parts_blocks", "qkv_blocks", "qkv_interleaved_blocks", "spec_from_module"]
