"""Model configuration: NeMo Megatron GPT key names (model_config.yaml), Llama family by the same keys."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelTokenizerConfig:
    """Tokenizer the model was trained with (NeMo's `model.tokenizer`). Paths may be `nemo:<member>`."""

    library: Optional[str] = None  # sentencepiece | huggingface
    model: Optional[str] = None


@dataclass
class ModelConfig:
    """One decoder-only transformer. Architecture keys use NeMo's names.

    When `restore_from_path` is set, the checkpoint's own architecture wins; the keys here
    still describe it so that a config can be validated (and sized) without the weights.
    """

    name: str = "tiny"
    # .nemo archive, extracted .nemo dir, Hugging Face safetensors dir, .gguf file, or
    # `pkg:<python package>/<file>` for a model shipped inside a pip package. null = random init.
    restore_from_path: Optional[str] = None
    precision: str = "bf16"  # bf16 | fp32 (on CPU the engine always computes in fp32)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1

    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 512
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # grouped-query attention; null = num_attention_heads
    kv_channels: Optional[int] = None  # head dim; null = hidden_size // num_attention_heads
    encoder_seq_length: int = 512
    max_position_embeddings: int = 512
    position_embedding_type: str = "rope"
    rotary_percentage: float = 1.0
    rotary_base: float = 10000.0
    normalization: str = "layernorm1p"  # layernorm1p | layernorm | rmsnorm
    layernorm_epsilon: float = 1e-5
    activation: str = "fast-swiglu"  # fast-swiglu | swiglu | gelu
    bias: bool = False
    share_embeddings_and_output_weights: bool = False
    vocab_size: Optional[int] = None  # null = the tokenizer's size (padded, see below)
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    use_scaled_init_method: bool = True  # output projections get std / sqrt(2 * num_layers)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    tokenizer: ModelTokenizerConfig = field(default_factory=ModelTokenizerConfig)

    # engine switches (GPU path)
    activations_checkpointing: bool = False
    torch_compile: bool = False
    # compiled training only: the backward keeps at most this fraction of the activations it would
    # save, recomputing the cheapest (torch._functorch's activation_memory_budget); 1 = save all.
    # GPT-2B packed 32,768 tokens: 79-90 -> 61.9 GiB at 0.7, 0-3% slower (benchmarks/rm.md)
    activation_memory_budget: float = 1.0

    # --- derived sizes, one place for the defaults NeMo leaves null ---
    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        # Megatron: int(head_dim * rotary_percentage); rotary acts on the first rotary_dim dims
        return int(self.head_dim * self.rotary_percentage) if self.position_embedding_type == "rope" else 0

    def padded_vocab_size(self, vocab_size: Optional[int] = None) -> int:
        """Megatron pads the vocab to a multiple of make_vocab_size_divisible_by * tp."""
        v = vocab_size if vocab_size is not None else self.vocab_size
        if v is None:
            raise ValueError("vocab size unknown: set model.vocab_size or pass the tokenizer's size")
        m = max(1, self.make_vocab_size_divisible_by) * max(1, self.tensor_model_parallel_size)
        return ((v + m - 1) // m) * m


ENGINE_SWITCHES = ("activations_checkpointing", "torch_compile", "activation_memory_budget")


def engine_switches(cfg) -> dict:
    """The runtime switches of a model config (a ModelConfig or the launcher's `model` node): how to
    run the model, not what it is; a checkpoint's architecture is loaded with these applied."""
    return {k: getattr(cfg, k) for k in ENGINE_SWITCHES}
