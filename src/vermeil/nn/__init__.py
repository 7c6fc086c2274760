"""Generic, modality-agnostic blocks; importing this package imports torch and nothing else. One topic per
file (docs/architecture.md lists them); math lives in functions, modules hold parameters and call them.
"""

from vermeil.nn.attention import (
    Attention,
    CrossAttention,
    FlashAttention,
    SelfAttention,
    attention,
    chunked_causal_attention,
)
from vermeil.nn.blocks import ParallelTransformerBlock, TransformerBlock
from vermeil.nn.cache import KVCache, RingKVCache, SSMState
from vermeil.nn.feedforward import GLU, FeedForward, GeGLU, SwiGLU, llama_hidden_dim
from vermeil.nn.flex import flex_attention, flex_block_mask
from vermeil.nn.lora import (
    LoRA,
    LoRALinear,
    apply_lora,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)
from vermeil.nn.mamba2 import Mamba2Block
from vermeil.nn.masks import (
    attention_mask,
    causal_mask,
    chunked_mask,
    document_mask,
    padding_mask,
    sliding_window_mask,
)
from vermeil.nn.modulation import AdaLayerNorm, MLPEmbedder, Modulation, ModulationOut, modulate
from vermeil.nn.moe import MoE, Router
from vermeil.nn.norms import LayerNorm, QKNorm, RMSNorm, rms_norm
from vermeil.nn.positional import (
    EmbedND,
    RopeScaling,
    RopeTables,
    RotaryEmbedding,
    apply_rotary,
    apply_scaling,
    rope_cos_sin,
    rope_inv_freq,
    rotate_qk,
    temperature_scale,
    timestep_embedding,
    xpos_scale,
)
from vermeil.nn.scan import selective_scan, selective_scan_ref, selective_step
from vermeil.nn.ssd import ssd_scan, ssd_scan_ref, ssd_step
from vermeil.nn.ssm import MambaBlock

__all__ = [
    "GLU",
    "AdaLayerNorm",
    "Attention",
    "CrossAttention",
    "EmbedND",
    "FeedForward",
    "FlashAttention",
    "GeGLU",
    "KVCache",
    "LayerNorm",
    "LoRA",
    "LoRALinear",
    "MLPEmbedder",
    "Mamba2Block",
    "MambaBlock",
    "MoE",
    "Modulation",
    "ModulationOut",
    "ParallelTransformerBlock",
    "QKNorm",
    "RMSNorm",
    "RingKVCache",
    "RopeScaling",
    "RopeTables",
    "RotaryEmbedding",
    "Router",
    "SSMState",
    "SelfAttention",
    "SwiGLU",
    "TransformerBlock",
    "apply_lora",
    "apply_rotary",
    "apply_scaling",
    "attention",
    "attention_mask",
    "causal_mask",
    "chunked_causal_attention",
    "chunked_mask",
    "llama_hidden_dim",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "modulate",
    "padding_mask",
    "document_mask",
    "flex_attention",
    "flex_block_mask",
    "rms_norm",
    "rope_cos_sin",
    "rope_inv_freq",
    "rotate_qk",
    "selective_scan",
    "selective_scan_ref",
    "selective_step",
    "sliding_window_mask",
    "ssd_scan",
    "ssd_scan_ref",
    "ssd_step",
    "temperature_scale",
    "timestep_embedding",
    "unmerge_lora",
    "xpos_scale",
]
