"""`Config`: one frozen, hashable description of a model, for all three families.

A `Config` is data: it is a valid static argument to `jax.jit`, it round-trips through JSON,
and every invalid combination fails at construction with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

FAMILIES = ("encoder", "decoder", "encdec")
# name -> (elementwise function name, gated). Gated MLPs compute act(x W0) * (x W1).
ACTIVATIONS = {
    "relu": ("relu", False),
    "gelu": ("gelu", False),
    "gelu_tanh": ("gelu_tanh", False),
    "silu": ("silu", False),
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
    "geglu_tanh": ("gelu_tanh", True),
    "reglu": ("relu", True),
}
NORMS = ("layernorm", "rmsnorm")
# pre: norm(x) into each sub-layer; post: norm after each residual add (BERT, BART);
# sandwich: norm(x) into the sub-layer and a second norm on its output before the add (Gemma 2/3).
NORM_POSITIONS = ("pre", "post", "sandwich")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "relative", "none")
# How RoPE frequencies are stretched past the trained length (zoo.nn.positions.rope_tables).
ROPE_SCALINGS = (None, "linear", "llama3", "dynamic", "yarn", "longrope")
# Per-layer attention kinds of `Config.layer_pattern`: "global" sees every earlier key,
# "local" the last `sliding_window` keys (an encoder's: those less than sliding_window away
# on either side).
LAYER_KINDS = ("global", "local")
DTYPES = ("float32", "bfloat16", "float16")
INITIALIZERS = ("normal", "gpt2", "t5")  # zoo.nn.param.init_std
# zoo.nn.backend: "auto" is resolved once at a model's entry, never inside the math.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "rows", "blockwise", "splash")
MATMULS = ("auto", "xla", "f32_accumulate")
LAYOUTS = ("stacked", "decoding")
ROUTERS = ("softmax", "sigmoid")  # zoo.nn.moe.route
MOE_DISPATCHES = ("sparse", "dense")  # zoo.nn.moe.apply_moe
GROUPED_MATMULS = ("auto", "ragged", "tiles")  # zoo.nn.moe.grouped_matmul
EXPERT_PARALLELS = ("all_to_all", "gather")  # zoo.nn.moe.apply_moe on an `expert` mesh axis


_TUPLE_FIELDS = ("layer_pattern", "rope_short_factor", "rope_long_factor", "dense_layers")


class ConfigError(ValueError):
    """An invalid `Config` field or combination of fields."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of one model. Field names follow the tensor they shape.

    `num_layers` is the encoder depth for `encoder`/`encdec` and the decoder depth for
    `decoder`; `num_decoder_layers` is the decoder depth of `encdec` (defaults to
    `num_layers`). `num_kv_heads` < `num_heads` gives GQA (1: MQA). `head_dim` defaults to
    `d_model // num_heads`.
    """

    family: str
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    num_decoder_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    activation: str = "gelu"
    # Norms.
    norm: str = "layernorm"
    norm_bias: bool = True
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    norm_offset: float = 0.0  # norms scale by (norm_offset + weight): Gemma stores weight - 1
    embed_norm: bool = False  # a norm right after the embeddings (BERT, BART)
    final_norm: bool = True  # a norm after the last layer (pre-norm models)
    first_attn_norm: bool = True  # False: layer 0's attention reads the embedding norm's output (ModernBERT)
    # Biases.
    attn_bias: bool = True  # q, k, v (and o unless attn_out_bias says otherwise)
    attn_out_bias: bool | None = None  # None: as attn_bias; Qwen2 has q/k/v biases only
    attn_key_bias: bool | None = None  # None: as attn_bias; False: q/v (and o) only (Whisper's k_proj)
    mlp_bias: bool = True
    # Positions.
    positions: str = "learned"
    # learned/sinusoidal: the size of the position table, a longer input is a ValueError;
    # rope/alibi/relative/none: the trained length, longer inputs run.
    max_len: int = 512
    position_offset: int = 0  # learned tables have max_len + offset rows (BART, RoBERTa: 2)
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # share of head_dim that is rotated
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192  # the pre-scaling context (llama3, yarn, longrope; dynamic: max_len)
    rope_beta_fast: float = 32.0  # yarn: rotations per context above which dims keep their speed
    rope_beta_slow: float = 1.0  # yarn: ... below which they are fully interpolated
    rope_attention_factor: float | None = None  # yarn/longrope cos/sin scale; None: the paper's
    rope_mscale: float | None = None  # yarn (DeepSeek): mscale, mscale_all_dim
    rope_mscale_all_dim: float | None = None
    rope_truncate: bool = True  # yarn: round the correction range to whole dims
    rope_short_factor: tuple[float, ...] = ()  # longrope: per-frequency stretch up to the
    rope_long_factor: tuple[float, ...] = ()  # original length, and beyond it
    relative_buckets: int = 32
    relative_max_distance: int = 128
    sliding_window: int | None = None
    # Attention kind of each layer, repeated over the depth: layer i is
    # layer_pattern[i % len(layer_pattern)] (Gemma 3: 5 x "local", "global"). Empty: every
    # layer "local" when sliding_window is set, else "global".
    layer_pattern: tuple[str, ...] = ()
    local_rope_theta: float | None = None  # RoPE base of "local" layers, unscaled (Gemma 3)
    type_vocab_size: int = 0  # BERT token types; 0: none
    # encdec: the encoder stack's own scheme and table size (Whisper: sinusoidal over
    # max_source_positions, learned decoder positions); None: positions / max_len.
    encoder_positions: str | None = None
    encoder_max_len: int | None = None
    # Attention.
    attn_scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    qk_norm: bool = False  # RMS-normalise each query and key head over head_dim (Qwen3, Gemma 3)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the vocabulary logits
    attn_sinks: bool = False  # a learned logit per head ("sinks" [N]) in every softmax, valueless (gpt-oss)
    # Multi-head latent attention (DeepSeek-V2/V3, zoo.nn.mla): set kv_lora_rank to use it.
    q_lora_rank: int | None = None  # queries through a normed [q_lora_rank] bottleneck; None: direct
    kv_lora_rank: int | None = None  # the joint key/value latent per token (what the cache stores)
    qk_nope_head_dim: int = 0  # per-head query/key dims without position (from the latent)
    qk_rope_head_dim: int = 0  # rotated query dims per head and one shared rotated key per token
    v_head_dim: int | None = None  # value dims per head; None: qk_nope_head_dim
    rope_interleave: bool = False  # MLA: rotate adjacent pairs (x0, x1), (x2, x3).. (DeepSeek's layout)
    # auto: cudnn where it applies (NVIDIA GPU, bf16/fp16, no additive bias, not decoding from
    # a cache), else xla | xla: einsums, any device | cudnn: NVIDIA's fused kernel, bf16/fp16
    # rows: the xla einsums one batch row at a time (fast on a CPU) | blockwise: blocks of
    # queries over blocks of keys with an online softmax, memory linear in the length
    # (zoo.nn.blockwise; auto picks it where one layer's scores would be large, see
    # zoo.nn.backend.choose_attention) | splash: the Pallas splash kernel on a TPU where the
    # masks fit it, else blockwise (zoo.nn.splash). zoo.nn.backend.resolve turns "auto" into
    # one of the others at the model's entry.
    attention: str = "auto"
    attention_block: int = 512  # blockwise: queries and keys per block
    # xla: a plain dot | f32_accumulate: bf16 products accumulated to fp32, then rounded (the
    # form a CPU's bf16 units run fast) | auto: the latter on a CPU.
    matmul: str = "auto"
    # Where the layers' parameters live: "stacked" on a leading [layers] axis (training,
    # checkpoints), or "decoding" (zoo.decoding.unstacked: one tree per layer, q/k/v and
    # gate/input matrices fused into one matmul each).
    layout: str = "stacked"
    # Run a stack's layers as one lax.scan (compile time flat in depth) or, False, unrolled
    # (no per-layer slicing and stacking of weights, activations and gradients: faster steps
    # on GPUs, compile time growing with depth). Parameters keep the stacked layout either way.
    scan_layers: bool = True
    # Cross-layer parameter sharing (ALBERT): 0, every layer its own parameters; n > 0, the
    # stack holds n layers' parameters and layer i of a stack of depth L runs set
    # int(i / (L / n)) (ALBERT's num_hidden_groups: blocks of consecutive layers share).
    shared_layers: int = 0
    # Embeddings and heads.
    tie_embeddings: bool = True
    embed_scale: float = 1.0  # multiplies token embeddings (BART scale_embedding: sqrt(d))
    logit_scale: float = 1.0  # multiplies final hidden before a tied head (T5: d**-0.5)
    logits_bias: bool = False  # a learned bias on the vocabulary logits (BART, BERT MLM)
    mlm_transform: bool = False  # BERT-style dense+act+norm before the MLM projection
    pooler: bool = False  # BERT pooler: tanh(dense(hidden[:, 0]))
    # Factorised embeddings (ALBERT): token, type and position tables (and the embedding
    # norm) this wide, projected to d_model into the stack; the MLM transform maps back.
    # None: d_model wide, no projection.
    embed_dim: int | None = None
    # encdec: the encoder reads float features [B, num_mel_bins, 2 * encoder max_len] through
    # a convolutional stem (Whisper, zoo.nn.stem) instead of token ids; None: token ids.
    num_mel_bins: int | None = None
    # Mixture of experts (0: dense MLP).
    num_experts: int = 0
    experts_per_token: int = 2
    moe_d_ff: int | None = None  # width of one routed expert; None: d_ff (d_ff stays the dense MLPs')
    router: str = "softmax"  # expert scores: softmax (Mixtral, Qwen3-MoE, gpt-oss) | sigmoid (DeepSeek-V3)
    router_norm_topk: bool = True  # renormalise the chosen k weights to sum to 1
    router_bias: bool = False  # a learned bias on the router logits (gpt-oss)
    router_score_bias: bool = False  # "score_bias" [E] added for selection only, no gradient (DeepSeek-V3)
    router_groups: int = 1  # group-limited routing: experts in router_groups groups (n_group),
    router_topk_groups: int = 1  # tokens pick among the best router_topk_groups groups (topk_group)
    routed_scaling: float = 1.0  # multiplies the routed experts' sum (routed_scaling_factor)
    shared_experts: int = 0  # a dense MLP of width shared_experts * moe_d_ff beside the routed ones
    dense_layers: tuple[int, ...] = ()  # layer indices with the dense MLP in an MoE model
    swiglu_limit: float | None = None  # gpt-oss experts: clamped SwiGLU (alpha 1.702, up + 1)
    moe_dispatch: str = "sparse"  # sparse: sorted tokens + ragged_dot (dropless) | dense: every expert
    # The sparse dispatch's grouped matmul (zoo.nn.moe.grouped_matmul): ragged (jax.lax.ragged_dot,
    # GPU/TPU) | tiles (a scan over one-expert row tiles: a CPU's form) | auto: zoo.nn.backend picks.
    grouped_matmul: str = "auto"
    # On a mesh whose `expert` axis splits the experts (zoo.nn.moe): all_to_all (each device routes its
    # tokens and sends every assignment to its expert's device) | gather (XLA gathers the weights).
    expert_parallel: str = "all_to_all"
    # Regularisation and numerics.
    dropout: float = 0.0
    # How `zoo.init` draws the weights: the published scheme of a family (init_std).
    initializer: str = "normal"
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"
    # Special tokens (used by objectives and generation).
    pad_id: int | None = 0  # None: no pad token (zoo.generate then fills with eos_id)
    bos_id: int | None = None
    eos_id: int | None = 1
    decoder_start_id: int | None = None  # encdec: first decoder input (T5: pad, BART: eos)

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:  # JSON gives lists; a Config must stay hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _validate(self)

    # Derived sizes -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def embed_size(self) -> int:
        return self.embed_dim or self.d_model

    @property
    def gated(self) -> bool:
        return ACTIVATIONS[self.activation][1]

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def out_bias(self) -> bool:
        return self.attn_bias if self.attn_out_bias is None else self.attn_out_bias

    @property
    def key_bias(self) -> bool:
        """Attention keys have a bias (attn_key_bias, default attn_bias)."""
        return self.attn_bias if self.attn_key_bias is None else self.attn_key_bias

    @property
    def encoder_stack(self) -> "Config":
        """The config an encdec encoder stack runs under: its positions and table size
        (encoder_positions, encoder_max_len) in place of the decoder's."""
        if self.encoder_positions in (None, self.positions) and self.encoder_max_len in (None, self.max_len):
            return self
        return self.replace(positions=self.encoder_positions or self.positions,
                            max_len=self.encoder_max_len or self.max_len)

    @property
    def mla(self) -> bool:
        """Self-attention is multi-head latent attention (zoo.nn.mla)."""
        return self.kv_lora_rank is not None

    @property
    def v_size(self) -> int:
        """Value dims per head of MLA (v_head_dim, default qk_nope_head_dim)."""
        return self.v_head_dim or self.qk_nope_head_dim

    def layer_kind(self, i: int) -> str:
        """"global" or "local": the attention kind of layer i (see layer_pattern)."""
        if self.layer_pattern:
            return self.layer_pattern[i % len(self.layer_pattern)]
        return "local" if self.sliding_window is not None else "global"

    def replace(self, **changes: Any) -> "Config":
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    # JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Config: unknown field(s) {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"Config.{field}: {message}")


def _validate(c: Config) -> None:
    _require(c.family in FAMILIES, "family", f"expected one of {FAMILIES}, got {c.family!r}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
        value = getattr(c, name)
        _require(isinstance(value, int) and value > 0, name, f"expected a positive int, got {value!r}")
    for name in ("num_decoder_layers", "num_kv_heads", "head_dim", "sliding_window"):
        value = getattr(c, name)
        _require(value is None or (isinstance(value, int) and value > 0), name,
                 f"expected None or a positive int, got {value!r}")
    _require(c.num_decoder_layers is None or c.family == "encdec", "num_decoder_layers",
             f"only the encdec family has a separate decoder depth (family={c.family!r})")
    _require(c.num_heads % c.kv_heads == 0, "num_kv_heads",
             f"num_heads={c.num_heads} must be a multiple of num_kv_heads={c.kv_heads}")
    _require(c.head_dim is not None or c.d_model % c.num_heads == 0, "head_dim",
             f"d_model={c.d_model} is not divisible by num_heads={c.num_heads}; set head_dim")
    _require(c.activation in ACTIVATIONS, "activation",
             f"expected one of {tuple(ACTIVATIONS)}, got {c.activation!r}")
    _require(c.norm in NORMS, "norm", f"expected one of {NORMS}, got {c.norm!r}")
    _require(not (c.norm == "rmsnorm" and c.norm_bias), "norm_bias", "rmsnorm has no bias")
    _require(c.norm_offset in (0.0, 1.0), "norm_offset", f"expected 0.0 or 1.0, got {c.norm_offset}")
    _require(c.norm_eps > 0, "norm_eps", f"expected > 0, got {c.norm_eps}")
    _require(c.norm_position in NORM_POSITIONS, "norm_position",
             f"expected one of {NORM_POSITIONS}, got {c.norm_position!r}")
    _require(c.positions in POSITIONS, "positions",
             f"expected one of {POSITIONS}, got {c.positions!r}")
    _require(c.rope_scaling in ROPE_SCALINGS, "rope_scaling",
             f"expected one of {ROPE_SCALINGS}, got {c.rope_scaling!r}")
    _require(c.rope_scaling is None or c.positions == "rope", "rope_scaling",
             f"needs positions='rope', got positions={c.positions!r}")
    _require(c.rope_scaling_factor >= 1.0, "rope_scaling_factor", f"expected >= 1, got {c.rope_scaling_factor}")
    _require(0.0 < c.rope_fraction <= 1.0, "rope_fraction", f"expected in (0, 1], got {c.rope_fraction}")
    _require(c.positions != "rope" or int(c.head_size * c.rope_fraction) % 2 == 0, "head_dim",
             f"rope needs an even number of rotated dims, got {c.head_size}*{c.rope_fraction}")
    _require(c.rope_theta > 0, "rope_theta", f"expected > 0, got {c.rope_theta}")
    _require(c.relative_buckets >= 2 and c.relative_max_distance >= 1, "relative_buckets",
             "expected relative_buckets >= 2 and relative_max_distance >= 1")
    _require(c.sliding_window is None or c.family in ("decoder", "encoder"), "sliding_window",
             f"only decoder and encoder models use a sliding window (family={c.family!r})")
    _require(c.first_attn_norm or (c.family == "encoder" and c.norm_position == "pre" and c.num_layers >= 2),
             "first_attn_norm", "False needs a pre-norm encoder of >= 2 layers, got "
             f"family={c.family!r}, norm_position={c.norm_position!r}, num_layers={c.num_layers}")
    _require(all(k in LAYER_KINDS for k in c.layer_pattern), "layer_pattern",
             f"expected entries from {LAYER_KINDS}, got {c.layer_pattern!r}")
    _require("local" not in c.layer_pattern or c.sliding_window is not None, "layer_pattern",
             "has 'local' layers but sliding_window is None")
    _require(c.local_rope_theta is None or (c.positions == "rope" and c.local_rope_theta > 0),
             "local_rope_theta", f"needs positions='rope' and a value > 0, got {c.local_rope_theta!r}")
    for name in ("attn_softcap", "final_softcap"):
        value = getattr(c, name)
        _require(value is None or value > 0, name, f"expected None or > 0, got {value!r}")
    _require(c.rope_scaling != "longrope" or (
        len(c.rope_short_factor) == len(c.rope_long_factor) == int(c.head_size * c.rope_fraction) // 2),
        "rope_short_factor", "longrope needs rope_short_factor and rope_long_factor with one "
        f"entry per rotated frequency ({int(c.head_size * c.rope_fraction) // 2}), got "
        f"{len(c.rope_short_factor)} and {len(c.rope_long_factor)}")
    _require(all(f > 0 for f in c.rope_short_factor + c.rope_long_factor), "rope_long_factor",
             "longrope stretch factors must be > 0")
    _require(c.rope_scaling not in ("yarn", "dynamic") or c.rope_scaling_factor > 1.0, "rope_scaling_factor",
             f"rope_scaling={c.rope_scaling!r} needs a factor > 1, got {c.rope_scaling_factor}")
    _require(c.rope_scaling != "dynamic" or int(c.head_size * c.rope_fraction) >= 4, "head_dim",
             f"dynamic rope needs at least 4 rotated dims, got {int(c.head_size * c.rope_fraction)}")
    _require(c.rope_original_max_len > 0, "rope_original_max_len", f"expected > 0, got {c.rope_original_max_len}")
    _require(c.rope_beta_fast >= c.rope_beta_slow > 0, "rope_beta_fast",
             f"yarn needs rope_beta_fast >= rope_beta_slow > 0, got {c.rope_beta_fast} and {c.rope_beta_slow}")
    _require(c.rope_scaling != "llama3" or c.rope_high_freq_factor > c.rope_low_freq_factor > 0,
             "rope_high_freq_factor", "llama3 needs rope_high_freq_factor > rope_low_freq_factor > 0, got "
             f"{c.rope_high_freq_factor} and {c.rope_low_freq_factor}")
    for name in ("rope_attention_factor", "rope_mscale", "rope_mscale_all_dim"):
        value = getattr(c, name)
        _require(value is None or value > 0, name, f"expected None or > 0, got {value!r}")
    _require(c.matmul in MATMULS, "matmul", f"expected one of {MATMULS}, got {c.matmul!r}")
    _require(c.layout in LAYOUTS, "layout", f"expected one of {LAYOUTS}, got {c.layout!r}")
    _require(c.position_offset >= 0, "position_offset", f"expected >= 0, got {c.position_offset}")
    _require(c.type_vocab_size >= 0, "type_vocab_size", f"expected >= 0, got {c.type_vocab_size}")
    _require(not c.mlm_transform or c.family == "encoder", "mlm_transform", "only the encoder has an MLM head")
    _require(not c.pooler or c.family == "encoder", "pooler", "only the encoder has a pooler")
    _require(c.embed_dim is None or (isinstance(c.embed_dim, int) and c.embed_dim > 0), "embed_dim",
             f"expected None or a positive int, got {c.embed_dim!r}")
    _require(c.embed_dim is None or c.family == "encoder", "embed_dim",
             f"only the encoder factorises its embeddings (family={c.family!r})")
    depths = sorted({c.num_layers, c.decoder_layers})
    _require(isinstance(c.shared_layers, int) and c.shared_layers >= 0
             and all(d % c.shared_layers == 0 for d in depths if c.shared_layers), "shared_layers",
             f"expected 0 or a number of parameter sets that divides the depth {depths}, got {c.shared_layers!r}")
    _require(not (c.shared_layers and c.dense_layers), "shared_layers",
             f"shared parameter sets hold one layer layout; dense_layers={c.dense_layers!r} mixes two")
    _require(c.num_experts >= 0, "num_experts", f"expected >= 0, got {c.num_experts}")
    _require(c.num_experts == 0 or 1 <= c.experts_per_token <= c.num_experts, "experts_per_token",
             f"expected 1..num_experts={c.num_experts}, got {c.experts_per_token}")
    _validate_moe(c)
    _validate_mla(c)
    _require(0.0 <= c.dropout < 1.0, "dropout", f"expected in [0, 1), got {c.dropout}")
    _require(isinstance(c.attn_sinks, bool), "attn_sinks", f"expected a bool, got {c.attn_sinks!r}")
    _require(c.attention in ATTENTION_IMPLEMENTATIONS, "attention",
             f"expected one of {ATTENTION_IMPLEMENTATIONS}, got {c.attention!r}")
    _require(isinstance(c.attention_block, int) and c.attention_block > 0, "attention_block",
             f"expected a positive int, got {c.attention_block!r}")
    _require(c.attention != "cudnn" or c.dtype != "float32", "attention",
             "the cudnn kernel needs dtype bfloat16 or float16")
    _require(c.initializer in INITIALIZERS, "initializer",
             f"expected one of {INITIALIZERS}, got {c.initializer!r}")
    _require(c.dtype in DTYPES, "dtype", f"expected one of {DTYPES}, got {c.dtype!r}")
    _require(c.param_dtype in DTYPES, "param_dtype", f"expected one of {DTYPES}, got {c.param_dtype!r}")
    _validate_encoder_inputs(c)
    for name in ("pad_id", "bos_id", "eos_id", "decoder_start_id"):
        value = getattr(c, name)
        _require(value is None or 0 <= value < c.vocab_size, name,
                 f"expected None or a token id in [0, {c.vocab_size}), got {value!r}")


def _validate_encoder_inputs(c: Config) -> None:
    """The encdec encoder's own positions and its feature input (Whisper), and the key bias."""
    for name in ("encoder_max_len", "num_mel_bins"):
        value = getattr(c, name)
        _require(value is None or (isinstance(value, int) and value > 0), name,
                 f"expected None or a positive int, got {value!r}")
    _require(c.encoder_positions is None or c.encoder_positions in POSITIONS, "encoder_positions",
             f"expected None or one of {POSITIONS}, got {c.encoder_positions!r}")
    for name in ("encoder_positions", "encoder_max_len", "num_mel_bins"):
        _require(getattr(c, name) is None or c.family == "encdec", name,
                 f"only the encdec family has a separate encoder (family={c.family!r})")
    _require(c.attn_key_bias in (None, False, True), "attn_key_bias",
             f"expected None or a bool, got {c.attn_key_bias!r}")
    _require(not c.attn_key_bias or c.attn_bias, "attn_key_bias",
             "True needs attn_bias=True (it only leaves the key bias out of q/k/v biases)")


def _validate_moe(c: Config) -> None:
    """The mixture-of-experts fields (zoo.nn.moe); their defaults are valid without experts."""
    _require(c.moe_d_ff is None or (isinstance(c.moe_d_ff, int) and c.moe_d_ff > 0), "moe_d_ff",
             f"expected None or a positive int, got {c.moe_d_ff!r}")
    _require(c.router in ROUTERS, "router", f"expected one of {ROUTERS}, got {c.router!r}")
    _require(c.moe_dispatch in MOE_DISPATCHES, "moe_dispatch",
             f"expected one of {MOE_DISPATCHES}, got {c.moe_dispatch!r}")
    _require(c.grouped_matmul in GROUPED_MATMULS, "grouped_matmul",
             f"expected one of {GROUPED_MATMULS}, got {c.grouped_matmul!r}")
    _require(c.expert_parallel in EXPERT_PARALLELS, "expert_parallel",
             f"expected one of {EXPERT_PARALLELS}, got {c.expert_parallel!r}")
    _require(not c.dense_layers or c.family == "decoder", "dense_layers",
             f"only decoder stacks mix dense and MoE layers (family={c.family!r})")
    _require(c.router_groups >= 1 and c.num_experts % c.router_groups == 0, "router_groups",
             f"expected >= 1 dividing num_experts={c.num_experts}, got {c.router_groups}")
    _require(1 <= c.router_topk_groups <= c.router_groups, "router_topk_groups",
             f"expected 1..router_groups={c.router_groups}, got {c.router_topk_groups}")
    per_group = c.num_experts // c.router_groups
    _require(c.num_experts == 0 or c.experts_per_token <= c.router_topk_groups * per_group,
             "router_topk_groups", f"{c.router_topk_groups} group(s) of {per_group} experts cannot "
             f"hold experts_per_token={c.experts_per_token}")
    _require(not c.router_score_bias or c.router == "sigmoid", "router_score_bias",
             f"the selection bias goes with router='sigmoid' (DeepSeek-V3), got router={c.router!r}")
    _require(c.routed_scaling > 0, "routed_scaling", f"expected > 0, got {c.routed_scaling}")
    _require(c.shared_experts >= 0, "shared_experts", f"expected >= 0, got {c.shared_experts}")
    _require(c.swiglu_limit is None or (c.swiglu_limit > 0 and c.activation == "swiglu"), "swiglu_limit",
             f"expected None or > 0 with activation='swiglu', got {c.swiglu_limit!r} "
             f"(activation={c.activation!r})")
    layers = c.decoder_layers if c.family == "decoder" else c.num_layers
    _require(all(isinstance(i, int) and 0 <= i < layers for i in c.dense_layers)
             and len(set(c.dense_layers)) == len(c.dense_layers), "dense_layers",
             f"expected distinct layer indices in [0, {layers}), got {c.dense_layers!r}")
    uses = {"moe_d_ff": c.moe_d_ff is not None, "router": c.router != "softmax",
            "router_bias": c.router_bias, "router_score_bias": c.router_score_bias,
            "router_groups": c.router_groups != 1, "routed_scaling": c.routed_scaling != 1.0,
            "shared_experts": c.shared_experts > 0, "dense_layers": bool(c.dense_layers),
            "swiglu_limit": c.swiglu_limit is not None}
    for name, used in uses.items():
        _require(c.moe or not used, name, "is a mixture-of-experts setting; set num_experts > 0")


def _validate_mla(c: Config) -> None:
    """The multi-head latent attention fields (zoo.nn.mla); unset unless kv_lora_rank is."""
    for name in ("q_lora_rank", "kv_lora_rank", "v_head_dim"):
        value = getattr(c, name)
        _require(value is None or (isinstance(value, int) and value > 0), name,
                 f"expected None or a positive int, got {value!r}")
    if not c.mla:
        for name, used in (("q_lora_rank", c.q_lora_rank is not None), ("qk_nope_head_dim", c.qk_nope_head_dim != 0),
                           ("qk_rope_head_dim", c.qk_rope_head_dim != 0), ("v_head_dim", c.v_head_dim is not None),
            ("rope_interleave", c.rope_interleave)):
            _require(not used, name, "is a multi-head latent attention setting; set kv_lora_rank")
        return
    _require(c.family == "decoder", "kv_lora_rank", f"MLA is a decoder attention (family={c.family!r})")
    _require(c.positions == "rope", "kv_lora_rank", f"MLA needs positions='rope', got {c.positions!r}")
    _require(isinstance(c.qk_rope_head_dim, int) and c.qk_rope_head_dim > 0 and c.qk_rope_head_dim % 2 == 0,
             "qk_rope_head_dim", f"MLA needs a positive even int, got {c.qk_rope_head_dim!r}")
    _require(isinstance(c.qk_nope_head_dim, int) and c.qk_nope_head_dim >= 0, "qk_nope_head_dim",
             f"expected an int >= 0, got {c.qk_nope_head_dim!r}")
    _require(c.v_size > 0, "v_head_dim", "MLA needs v_head_dim (or qk_nope_head_dim) > 0")
    for name in ("qk_norm", "attn_bias", "attn_out_bias", "attn_sinks", "attn_softcap", "local_rope_theta"):
        _require(not getattr(c, name), name, f"is not supported with MLA (kv_lora_rank), got {getattr(c, name)!r}")
    _require(c.rope_fraction == 1.0, "rope_fraction", "MLA rotates qk_rope_head_dim dims; leave rope_fraction 1")
    _require(c.rope_scaling not in ("dynamic", "longrope"), "rope_scaling",
             f"MLA supports none, linear, llama3 and yarn, got {c.rope_scaling!r}")
