"""The dynamic cross-encoder: one BERT that scores (query, passage) pairs at many widths and depths,
with a ranking head after every layer so a passage can leave early.

DynaBERT's network (Hou et al., 2020) with FastBERT / DeeBERT exits, built for ranking:

* **width** ``w`` keeps the first ⌈w·heads⌉ attention heads and the first ⌈w·ffn⌉ FFN neurons of every
  layer. The weight matrices are *sliced* (views), so a narrow network really does smaller matmuls;
  rewiring (``rewire.py``) first puts the important heads and neurons in front.
* **depth** ``d`` keeps ⌈d·L⌉ layers, dropped evenly by DynaBERT's rule: kept layer i is ⌊i/d⌋.
  DynaBERT itself rounds d·L with Python's ``round`` (4.5 → 4); for the 12-layer BERT-base all three
  depths give whole numbers and both rules agree. For 6 layers (MiniLM-L6) we round *up*, as width
  does: depth 0.5 → layers [0, 2, 4], depth 0.75 → [0, 1, 2, 4, 5], depth 1 → all six.
* the **final head** (the cross-encoder's own pooler + classifier) scores after the last *executed*
  layer at every depth, as DynaBERT shares its classifier. **Exit head** l scores after physical layer
  l; the exit of the last physical layer is the final head itself.
* ``depth_layers="prefix"`` (a model's choice, recorded in rankshrink.json) keeps the *first* ⌈d·L⌉ layers
  instead, and a depth below 1 scores with the exit head after its last layer: a depth sub-network is then
  the full network stopped early, the same computation as every document exiting there.

The engine runs the building blocks itself (``embed``, ``layers_for``, ``run_layer``, ``exit_score``,
``final_score``) on batches that shrink as passages exit; ``forward`` strings them together for training.

>>> import rankshrink
>>> model = rankshrink.load_model("../shared/models/all-MiniLM-L6-v2")     # doctest: +SKIP
>>> model.score("what is a cat", ["A cat is a small feline.", "Paris is in France."], width=0.5, depth=0.5)  # doctest: +SKIP
tensor([ 2.1, -3.4])
"""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}

# oneDNN's fused linear (ReLU/GELU and a residual add inside the matmul): see "CPU inference kernels".
FUSABLE_ACTIVATIONS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                       "relu": ("relu", "")}

# Rounding guard: 0.7 * 10 is 7.000000000000001 in floating point, and must still keep 7.
_EPS = 1e-9


@dataclass(frozen=True)
class ModelConfig:
    """Every size of the network; ``from_hf`` reads a Hugging Face ``BertConfig`` dict."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    head_size: int = 32
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    pad_token_id: int = 0
    # Layers with an exit head of their own; None means every layer but the last (whose exit is the final head).
    exit_layers: tuple[int, ...] | None = None
    # What an exit head reads (EXIT_POOLINGS); the final head is always BERT's [CLS] pooler.
    exit_pooling: str = "cls"
    # Which layers a depth keeps (DEPTH_LAYERS): DynaBERT's evenly spread ones, or the first ones.
    depth_layers: str = "spread"
    # The settings the network is trained for (recorded in rankshrink.json; any value in (0, 1] runs).
    widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    depths: tuple[float, ...] = (0.5, 0.75, 1.0)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise InputError(f"hidden_act {self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
        if self.exit_layers is None:
            object.__setattr__(self, "exit_layers", tuple(range(self.num_layers - 1)))
        exit_layers = tuple(sorted(int(layer) for layer in self.exit_layers))
        if any(not 0 <= layer < self.num_layers - 1 for layer in exit_layers):
            raise InputError(f"exit_layers {list(exit_layers)}: each must be a layer in 0..{self.num_layers - 2} "
                             f"(the last layer's exit is the final head)")
        object.__setattr__(self, "exit_layers", exit_layers)
        check_exit_pooling(self.exit_pooling)
        check_depth_layers(self.depth_layers)
        object.__setattr__(self, "widths", tuple(float(w) for w in self.widths))
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Read a Hugging Face BERT ``config.json`` (as a dict)."""
        model_type = hf.get("model_type", "bert")
        if model_type != "bert":
            raise InputError(f"expected a BERT-architecture checkpoint (model_type 'bert'), found {model_type!r}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise InputError(f"position_embedding_type {hf['position_embedding_type']!r} is not supported "
                             f"(expected 'absolute')")
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        absent = [key for key in required if key not in hf]
        if absent:
            raise InputError(f"the config lacks {absent} (a BERT config.json has {list(required)})")
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if hidden % heads:
            raise InputError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        values = dict(
            vocab_size=int(hf["vocab_size"]), hidden_size=hidden, num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads, head_size=hidden // heads, intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
            type_vocab_size=int(hf.get("type_vocab_size", 2)), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            hidden_act=str(hf.get("hidden_act", "gelu")),
            hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
            pad_token_id=int(hf.get("pad_token_id") or 0),
        )
        values.update(overrides)
        return cls(**values)

    def to_hf(self, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A ``BertForSequenceClassification`` config.json dict with one label; ``base`` keeps its other keys."""
        if self.num_heads * self.head_size != self.hidden_size:
            raise ValueError(f"{self.num_heads} heads of size {self.head_size} do not fill hidden size "
                             f"{self.hidden_size}: a plain BERT config cannot express it (export with io.export_hf)")
        hf = {key: value for key, value in (base or {}).items()
              if key not in ("id2label", "label2id", "num_labels", "_name_or_path", "torch_dtype", "dtype")}
        hf.update(
            architectures=["BertForSequenceClassification"], model_type="bert", vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps, hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout, attention_probs_dropout_prob=self.attention_dropout,
            pad_token_id=self.pad_token_id, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
        )
        hf.setdefault("position_embedding_type", "absolute")
        return hf

    # -- the width and depth rules, in one place --------------------------------------------------

    def heads_for(self, width: float) -> int:
        """Attention heads kept at ``width``: ⌈width · heads⌉ (at least one)."""
        return max(1, math.ceil(_check_multiplier(width, "width") * self.num_heads - _EPS))

    def neurons_for(self, width: float) -> int:
        """FFN neurons kept at ``width``: ⌈width · intermediate_size⌉ (at least one)."""
        return max(1, math.ceil(_check_multiplier(width, "width") * self.intermediate_size - _EPS))

    def layers_for(self, depth: float) -> list[int]:
        """Physical layers run at ``depth``: ⌈depth · L⌉ of them, kept layer i being ⌊i / depth⌋ (DynaBERT), or
        the first ones (``depth_layers="prefix"``)."""
        depth = _check_multiplier(depth, "depth")
        kept = max(1, math.ceil(depth * self.num_layers - _EPS))
        if self.depth_layers == "prefix":
            return list(range(kept))
        return [min(self.num_layers - 1, math.floor(i / depth + _EPS)) for i in range(kept)]

    def ends_at_exit_head(self, depth: float) -> bool:
        """Whether ``depth`` scores with an exit head (a prefix depth short of the last layer), not the final head."""
        return self.depth_layers == "prefix" and self.layers_for(depth)[-1] != self.num_layers - 1


def _check_multiplier(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# CPU inference kernels
#
# Without autograd on CPU, linear layers run through oneDNN's fused linear, the kernel torch.compile
# emits for CPU: the bias, the GELU and the residual add happen inside the matmul rather than as extra
# passes over the activations (~1.5x faster in bf16 here, and more accurate, as nothing is rounded in
# between). Training, tracing and other devices use F.linear. The kernel is fast on row-major weights and
# on column-major ones, but very slow on a row-major *column slice*: that is why the output projections,
# which width slices by column, are stored column-major (see SelfAttention and FeedForward).

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# oneDNN builds a kernel per matrix shape and keeps the last 1024; a query's micro-batches are new shapes (rows ×
# length), and dl19's 43 queries need ~200 per linear, so the default cache keeps rebuilding them. oneDNN reads
# this when it builds its first kernel (so it holds when nothing ran oneDNN before rankshrink was imported); a
# user's own setting wins. Measured: 3.74x -> 3.85x against the peer in one pair of benches, less than this
# machine's drift between runs (eval/README.md).
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")


# Scores of one slice of heads in bf16_attention: about what stays in this CPU's 1 MiB-per-core L2. Alone,
# an attention call at 96-256 tokens ran 2.5-3x faster sliced; a whole rerank did not measurably (eval/README.md).
ATTENTION_SLICE_BYTES = 2 << 20


def use_fused_kernels(x: torch.Tensor, training: bool) -> bool:
    # oneDNN's fused ops do not autocast: under torch.autocast (a frozen teacher while training) use F.linear.
    return (_ONEDNN and not training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and not torch.jit.is_tracing()
            and not torch.is_autocast_enabled("cpu"))


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + padding) · v for bf16 inference, as two batched matmuls and a softmax, a few
    heads at a time so that each slice's scores stay in cache (``ATTENTION_SLICE_BYTES``).

    With 32-wide heads and sequences of 64–256 tokens, SDPA's CPU flash kernel is the slower choice in bf16
    (eval/README.md); in fp32 it is the faster one, so fp32 keeps SDPA. ``mask``: None or the boolean
    [batch, 1, 1, length] of ``attention_mask_for``; any other mask goes to SDPA."""
    batch, heads, length, size = k.shape
    queries = q.shape[2]
    if mask is not None and (mask.dtype != torch.bool or mask.shape != (batch, 1, 1, length)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q = q.reshape(batch * heads, queries, size)
    k, v = (part.reshape(batch * heads, length, size) for part in (k, v))
    padding = None
    if mask is not None:
        padding = torch.zeros(mask.shape, dtype=q.dtype).masked_fill_(~mask, float("-inf"))
        padding = padding.expand(batch, heads, 1, length).reshape(batch * heads, 1, length)
    context = torch.empty_like(q)
    step = max(1, ATTENTION_SLICE_BYTES // (queries * length * q.element_size()))
    for start in range(0, batch * heads, step):
        part = slice(start, start + step)
        if padding is None:
            scores = torch.bmm(q[part], k[part].transpose(1, 2)).mul_(size ** -0.5)
        else:
            scores = torch.baddbmm(padding[part], q[part], k[part].transpose(1, 2), alpha=size ** -0.5)
        torch.bmm(torch.softmax(scores, -1), v[part], out=context[part])
    return context.view(batch, heads, queries, size)


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, fused: bool,
          activation: tuple[str, str] = ("none", "")) -> torch.Tensor:
    """activation(x·Wᵀ + b) for a fusable activation, else x·Wᵀ + b."""
    if fused:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation[0], [], activation[1])
    return F.linear(x, weight, bias)


def dense_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, fused: bool,
              dropout: nn.Dropout) -> torch.Tensor:
    """residual + dropout(x·Wᵀ + b)."""
    if fused:  # eval mode: dropout is the identity
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return residual + dropout(F.linear(x, weight, bias))


def column_major(linear: nn.Linear) -> None:
    """Store ``linear.weight`` column-major, so that ``weight[:, :k]`` is one contiguous block."""
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())


# ---------------------------------------------------------------------------------------------
# Modules (names follow the paper, not Hugging Face; io.py maps between them)


class Embeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.word(input_ids) + self.token_type(token_type_ids) + self.position(positions)
        return self.dropout(self.norm(hidden))


def interleave_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's separate Q, K, V ([heads·d, ...] each) → one [heads·3·d, ...] tensor, head by head."""
    return torch.stack([part.reshape(heads, -1, *part.shape[1:]) for part in (query, key, value)], dim=1) \
        .reshape(-1, *query.shape[1:])


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``interleave_heads``."""
    parts = qkv.reshape(heads, 3, -1, *qkv.shape[1:])
    return tuple(parts[:, i].reshape(-1, *qkv.shape[1:]) for i in range(3))


class SelfAttention(nn.Module):
    """Multi-head self-attention + output projection + residual + LayerNorm, over the first ``heads`` heads.

    Q, K and V are one projection laid out head by head (rows [q₀ k₀ v₀ q₁ k₁ v₁ ...]), so one matmul
    computes all three and the first ``heads`` heads are one contiguous block of rows."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inner = config.num_heads * config.head_size
        self.head_size = config.head_size
        self.qkv = nn.Linear(config.hidden_size, 3 * inner)
        self.output = nn.Linear(inner, config.hidden_size)
        column_major(self.output)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.attention_dropout = config.attention_dropout

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, heads: int,
                head_mask: torch.Tensor | None = None, first_token_only: bool = False) -> torch.Tensor:
        batch, length, _ = hidden.shape
        inner = heads * self.head_size
        fused = use_fused_kernels(hidden, self.training)
        # Width: the first heads' rows of QKV and columns of the output projection (views, no copy).
        qkv = dense(hidden, self.qkv.weight[:3 * inner], self.qkv.bias[:3 * inner], fused)
        q, k, v = (part.transpose(1, 2) for part in qkv.view(batch, length, heads, 3, self.head_size).unbind(3))
        if first_token_only:  # every token is a key, only [CLS] asks
            q, hidden = q[:, :, :1], hidden[:, :1].contiguous()
            length = 1
        if fused and q.dtype == torch.bfloat16:
            context = bf16_attention(q, k, v, mask)
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attention_dropout if self.training else 0.0)
        if head_mask is not None:  # DynaBERT's importance: d loss / d head_mask
            context = context * head_mask[:heads].view(1, heads, 1, 1).to(context.dtype)
        context = context.transpose(1, 2).reshape(batch, length, inner)
        return self.norm(dense_add(context, self.output.weight[:, :inner], self.output.bias, hidden, fused,
                                   self.dropout))


class FeedForward(nn.Module):
    """Position-wise FFN + residual + LayerNorm, over the first ``neurons`` intermediate neurons."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        column_major(self.down)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.fused_activation = FUSABLE_ACTIVATIONS.get(config.hidden_act)

    def forward(self, hidden: torch.Tensor, neurons: int, neuron_mask: torch.Tensor | None = None) -> torch.Tensor:
        fused = use_fused_kernels(hidden, self.training)
        up_weight, up_bias = self.up.weight[:neurons], self.up.bias[:neurons]
        if fused and self.fused_activation:
            inner = dense(hidden, up_weight, up_bias, fused, self.fused_activation)
        else:
            inner = self.activation(dense(hidden, up_weight, up_bias, fused))
        if neuron_mask is not None:
            inner = inner * neuron_mask[:neurons].to(inner.dtype)
        return self.norm(dense_add(inner, self.down.weight[:, :neurons], self.down.bias, hidden, fused,
                                   self.dropout))


class Layer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.ffn = FeedForward(config)

    def forward(self, hidden, mask, heads, neurons, head_mask=None, neuron_mask=None, first_token_only=False):
        return self.ffn(self.attention(hidden, mask, heads, head_mask, first_token_only), neurons, neuron_mask)


# What a ranking head reads from the hidden states:
#   cls:  the [CLS] token, as BERT's pooler does (the final head always; HF-compatible).
#   pair: the mean of the query's tokens (segment 0) and of the passage's (segment 1) and their product,
#         [m_q ⊙ m_p, m_q, m_p]. After the first layers of an encoder trained for mean pooling (MiniLM
#         sentence-transformers), [CLS] is the same vector for every passage (std across 100 passages ~0.001),
#         so a [CLS] exit head cannot rank there; the product term gives the head a bi-encoder's similarity.
EXIT_POOLINGS = ("cls", "pair")
DEPTH_LAYERS = ("spread", "prefix")


def check_exit_pooling(pooling: Any) -> str:
    if pooling not in EXIT_POOLINGS:
        raise InputError(f"exit_pooling {pooling!r} is not supported; expected one of {list(EXIT_POOLINGS)}")
    return pooling


def check_depth_layers(rule: Any) -> str:
    if rule not in DEPTH_LAYERS:
        raise InputError(f"depth_layers {rule!r} is not supported; expected one of {list(DEPTH_LAYERS)}")
    return rule


class RankingHead(nn.Module):
    """pooling → tanh(pooler) → one score: the shape of BERT's pooler + a one-label classifier."""

    def __init__(self, config: ModelConfig, pooling: str = "cls"):
        super().__init__()
        self.pooling = pooling
        features = 3 * config.hidden_size if pooling == "pair" else config.hidden_size
        self.pooler = nn.Linear(features, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` [batch, length, hidden]; ``attention_mask`` [batch, length] 1/0 or the boolean
        [batch, 1, 1, length] of ``attention_mask_for`` or None (nothing padded); ``token_type_ids``
        [batch, length] (None: all segment 0). Only "pair" pooling reads the last two."""
        if self.pooling == "pair":
            features = pair_features(hidden, attention_mask, token_type_ids)
        else:
            features = hidden[:, 0]
        pooled = torch.tanh(self.pooler(features))
        return self.classifier(self.dropout(pooled)).squeeze(-1)


def pair_features(hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                  token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """[m_q ⊙ m_p, m_q, m_p]: the means of each pair's query and passage tokens (padding left out)."""
    batch, length, _ = hidden.shape
    valid = torch.ones(batch, length, dtype=torch.bool) if attention_mask is None else \
        attention_mask.reshape(batch, length).bool()
    passage = torch.zeros(batch, length, dtype=torch.bool) if token_type_ids is None else token_type_ids.bool()
    segments = torch.stack([valid & ~passage, valid & passage], 1).to(hidden.dtype)   # [batch, 2, length]
    segments = segments / segments.sum(-1, keepdim=True).clamp(min=1)
    means = torch.bmm(segments, hidden)                                               # [batch, 2, hidden]
    query, passage_mean = means[:, 0], means[:, 1]
    return torch.cat([query * passage_mean, query, passage_mean], -1)


@dataclass
class RankerOutput:
    """What ``forward`` returns. Scores are [batch]; ``hidden_states`` (when asked) holds the embedding
    output then the output of each executed layer, in the order of ``layers``."""

    score: torch.Tensor
    exit_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden_states: list[torch.Tensor] | None = None
    layers: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The network


class DynamicCrossEncoder(nn.Module):
    """A BERT cross-encoder that runs at any width and depth, with an exit head after each layer.

    Attributes besides the modules: ``config`` (ModelConfig), ``tokenizer`` (a Hugging Face fast tokenizer
    or None), ``metadata`` (a JSON-able dict saved in rankshrink.json: other modules keep their
    ``calibration`` and ``profile`` there), ``rewiring`` (the head/neuron order applied, or None),
    ``hf_config`` (the checkpoint's own config.json, kept for export).
    """

    def __init__(self, config: ModelConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.head = RankingHead(config)
        self.exits = nn.ModuleDict({str(layer): RankingHead(config, config.exit_pooling)
                                    for layer in config.exit_layers})
        self.tokenizer = tokenizer
        self.metadata: dict[str, Any] = {}
        self.rewiring: dict[str, list[list[int]]] | None = None
        self.hf_config: dict[str, Any] = {}
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation; loading a checkpoint overwrites all but the parts it lacks.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- sizes ----------------------------------------------------------------------------------

    def heads_for(self, width: float) -> int:
        return self.config.heads_for(width)

    def neurons_for(self, width: float) -> int:
        return self.config.neurons_for(width)

    def layers_for(self, depth: float) -> list[int]:
        """Physical layer indices executed at ``depth`` (DynaBERT's even dropping; see the module docstring)."""
        return self.config.layers_for(depth)

    def flops(self, width: float = 1.0, depth: float = 1.0, seq_len: int = 128) -> int:
        """Floating-point operations (2 per multiply-add) to score one pair of ``seq_len`` tokens.

        Matmuls only: embedding lookups, LayerNorm, softmax and GELU are O(seq_len · hidden) and left out.
        The last layer runs for [CLS] alone where its head reads nothing else (``scores_from_first_token``).
        """
        layers = self.layers_for(depth)
        return ((len(layers) - 1) * self.layer_flops(width, seq_len)
                + self.layer_flops(width, seq_len, self.scores_from_first_token(layers[-1])) + self.head_flops())

    def layer_flops(self, width: float, seq_len: int, first_token_only: bool = False) -> int:
        """FLOPs of one layer at ``width`` on one pair of ``seq_len`` tokens (``run_layer``'s ``first_token_only``:
        Q, K, V for every token, the rest for [CLS] alone)."""
        s, h = seq_len, self.config.hidden_size
        a = self.heads_for(width) * self.config.head_size   # attention width
        f = self.neurons_for(width)                         # FFN width
        rows = 1 if first_token_only else s                 # tokens that ask (queries) and go on through the layer
        return (
            3 * 2 * s * h * a      # Q, K, V projections
            + 2 * rows * s * a     # scores Q·Kᵀ, all heads
            + 2 * rows * s * a     # attention-weighted sum of V
            + 2 * rows * a * h     # attention output projection
            + 2 * 2 * rows * h * f # FFN up and down
        )

    def head_flops(self) -> int:
        """FLOPs of one ranking head (final or exit) on one pair: pooler + classifier on [CLS]."""
        h = self.config.hidden_size
        return 2 * h * h + 2 * h

    # -- building blocks (the engine calls these on shrinking batches) --------------------------

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position + segment embeddings: [batch, length] → [batch, length, hidden]."""
        return self.embeddings(input_ids, token_type_ids)

    @staticmethod
    def attention_mask_for(attention_mask: torch.Tensor | None, skip_if_full: bool = True) -> torch.Tensor | None:
        """[batch, length] 1/0 padding mask → the boolean [batch, 1, 1, length] mask SDPA takes
        (None when nothing is padded, which lets SDPA use its fastest kernel)."""
        if attention_mask is None or attention_mask.dim() == 4:
            return attention_mask
        if skip_if_full and bool(attention_mask.all()):
            return None
        return attention_mask.bool()[:, None, None, :]

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                  width: float = 1.0, *, head_mask: torch.Tensor | None = None,
                  neuron_mask: torch.Tensor | None = None, first_token_only: bool = False) -> torch.Tensor:
        """Physical layer ``index`` at ``width``. ``attention_mask``: [batch, length] 1/0, or the output of
        ``attention_mask_for`` (compute it once per batch), or None. ``head_mask`` [num_heads] and
        ``neuron_mask`` [intermediate_size] multiply head outputs / FFN activations (for importance).
        ``first_token_only``: return [batch, 1, hidden], the [CLS] token alone (every token still attended
        to) — all that a [CLS] head after the last layer reads (``scores_from_first_token``), at about a quarter
        of the cost (96 tokens)."""
        mask = self.attention_mask_for(attention_mask)
        return self.layers[index](hidden, mask, self.heads_for(width), self.neurons_for(width),
                                  head_mask, neuron_mask, first_token_only)

    def exit_score(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Score of the exit head after physical layer ``index`` ([batch]); the last layer's exit is the final
        head. A "pair"-pooled exit head needs the batch's padding mask and token types (see ``RankingHead``)."""
        if index == self.config.num_layers - 1:
            return self.head(hidden)
        if str(index) not in self.exits:
            raise ValueError(f"no exit head after layer {index}; this model has exits after {list(self.config.exit_layers)}")
        return self.exits[str(index)](hidden, attention_mask, token_type_ids)

    def final_score(self, hidden: torch.Tensor) -> torch.Tensor:
        """The cross-encoder's own head ([batch])."""
        return self.head(hidden)

    def last_score(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The score after physical layer ``index``, the last one a depth runs: the final head at every depth
        of a "spread" model (DynaBERT shares its classifier), the exit head there in a "prefix" model."""
        if self.config.depth_layers == "prefix":
            return self.exit_score(index, hidden, attention_mask, token_type_ids)
        return self.head(hidden)

    def scores_from_first_token(self, index: int) -> bool:
        """Whether ``last_score`` after physical layer ``index`` reads the [CLS] token alone (a "cls" head), so
        that layer may run ``first_token_only``."""
        if self.config.depth_layers == "prefix":
            return self.has_exit(index) and self._exit_head(index).pooling == "cls"
        return self.head.pooling == "cls"

    def _exit_head(self, index: int) -> RankingHead:
        """The head ``exit_score`` uses after physical layer ``index`` (one that ``has_exit``)."""
        return self.head if index == self.config.num_layers - 1 else self.exits[str(index)]

    def has_exit(self, index: int) -> bool:
        return index == self.config.num_layers - 1 or str(index) in self.exits

    # -- the whole network --------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, *, width: float = 1.0, depth: float = 1.0,
                exits: Iterable[int] | Literal["all"] | None = None, head_mask: torch.Tensor | None = None,
                neuron_mask: torch.Tensor | None = None, output_hidden_states: bool = False) -> RankerOutput:
        """Score a batch of tokenized pairs at (``width``, ``depth``).

        ``exits``: physical layers whose exit-head scores to return ("all": every executed layer that has one).
        ``head_mask`` [num_layers, num_heads] / ``neuron_mask`` [num_layers, intermediate_size]: multiplied
        into head outputs and FFN activations (DynaBERT's importance is the gradient w.r.t. them).
        Everything returned is differentiable.
        """
        layers = self.layers_for(depth)
        if exits == "all":
            wanted = {index for index in layers if self.has_exit(index)}
        else:
            wanted = set(exits or ())
            not_run = sorted(wanted - set(layers))
            if not_run:
                raise ValueError(f"exits {not_run} are not executed at depth {depth} (layers {layers})")
            for index in wanted:
                if not self.has_exit(index):
                    raise ValueError(f"no exit head after layer {index}")
        mask = self.attention_mask_for(attention_mask)
        hidden = self.embed(input_ids, token_type_ids)
        hidden_states = [hidden] if output_hidden_states else None
        exit_scores: dict[int, torch.Tensor] = {}
        # Scoring only: the last layer for [CLS] alone when nothing after it reads other tokens. Training keeps
        # every token (the same scores; the dropout masks, and so a seed's model, stay as they were).
        last = layers[-1]
        first_token_only = (not self.training and not output_hidden_states and self.scores_from_first_token(last)
                            and (last not in wanted or self._exit_head(last).pooling == "cls"))
        for index in layers:
            hidden = self.run_layer(index, hidden, mask, width,
                                    head_mask=None if head_mask is None else head_mask[index],
                                    neuron_mask=None if neuron_mask is None else neuron_mask[index],
                                    first_token_only=first_token_only and index == last)
            if hidden_states is not None:
                hidden_states.append(hidden)
            if index in wanted:
                exit_scores[index] = self.exit_score(index, hidden, mask, token_type_ids)
        return RankerOutput(self.last_score(layers[-1], hidden, mask, token_type_ids), exit_scores, hidden_states,
                            layers)

    # -- text in, scores out --------------------------------------------------------------------

    def encode(self, queries: Sequence[str], passages: Sequence[str], max_length: int = 512) -> dict[str, list]:
        """Token ids of each pair, unpadded: query first, only the passage truncated (a query too long
        to leave room for any passage is truncated too)."""
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer (its directory had none); load one with "
                             "transformers.AutoTokenizer and set model.tokenizer")
        queries, passages = list(queries), list(passages)
        options = dict(max_length=max_length, return_token_type_ids=True, return_attention_mask=True)
        try:
            return dict(self.tokenizer(queries, passages, truncation="only_second", **options))
        except Exception:  # the tokenizer refuses only_second when a query fills max_length: do those pairs alone
            encoded: dict[str, list] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
            for query, passage in zip(queries, passages):
                try:
                    pair = self.tokenizer(query, passage, truncation="only_second", **options)
                except Exception:
                    pair = self.tokenizer(query, passage, truncation="longest_first", **options)
                for key in encoded:
                    encoded[key].append(pair[key])
            return encoded

    def tokenize(self, queries: Sequence[str], passages: Sequence[str], max_length: int = 512) -> dict[str, torch.Tensor]:
        """``encode``, padded to the longest pair: ``input_ids``, ``token_type_ids``, ``attention_mask`` tensors."""
        return self._pad(self.encode(queries, passages, max_length))

    def _pad(self, encoded: Mapping[str, list]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer.pad(dict(encoded), return_tensors="pt"))

    def score(self, queries: str | Sequence[str], passages: Sequence[str], width: float = 1.0,
              depth: float = 1.0, max_length: int = 512, batch_size: int = 32,
              progress: bool = False) -> torch.Tensor:
        """One float32 score per (query, passage) pair at (``width``, ``depth``); a single query string is
        paired with every passage. Batches are length-sorted, results come back in input order.

        >>> model.score("what is a cat", ["A cat is a small feline.", "Paris is in France."])  # doctest: +SKIP
        tensor([ 2.1, -3.4])
        """
        passages = list(passages)
        queries = [queries] * len(passages) if isinstance(queries, str) else list(queries)
        if len(queries) != len(passages):
            raise ValueError(f"{len(queries)} queries but {len(passages)} passages; expected one query per passage")
        scores = torch.empty(len(passages), dtype=torch.float32)
        if not passages:
            return scores
        encoded = self.encode(queries, passages, max_length)
        order = sorted(range(len(passages)), key=lambda i: len(encoded["input_ids"][i]))
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            from tqdm.auto import tqdm

            with torch.inference_mode():
                for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch",
                                  disable=not progress):
                    chunk = order[start:start + batch_size]
                    batch = self._pad({key: [values[i] for i in chunk] for key, values in encoded.items()})
                    batch = {key: value.to(device) for key, value in batch.items()}
                    out = self(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                               width=width, depth=depth)
                    scores[torch.tensor(chunk)] = out.score.float().cpu()
        finally:
            self.train(was_training)
        return scores

    # -- a physically smaller copy ------------------------------------------------------------

    def subnetwork(self, width: float = 1.0, depth: float = 1.0) -> "DynamicCrossEncoder":
        """A standalone copy holding only the (``width``, ``depth``) sub-network: fewer heads, neurons and
        layers, contiguous weights. At width 1 and depth 1 it is the whole network. Its scores equal this
        model's at (``width``, ``depth``); its exit heads are those of the kept layers, renumbered."""
        layers = self.layers_for(depth)
        if self.config.ends_at_exit_head(depth):
            raise InputError(f"depth {depth} of this model ends at the exit head after layer {layers[-1]}, which a "
                             f"standalone network (a plain BERT's [CLS] head) cannot hold; take depth 1")
        heads, neurons, size = self.heads_for(width), self.neurons_for(width), self.config.head_size
        exit_layers = tuple(new for new, old in enumerate(layers[:-1]) if str(old) in self.exits)
        config = replace(self.config, num_layers=len(layers), num_heads=heads, intermediate_size=neurons,
                         exit_layers=exit_layers, widths=(1.0,), depths=(1.0,))
        small = DynamicCrossEncoder.blank(config, tokenizer=self.tokenizer)
        parameter = next(self.parameters())
        small.to(device=parameter.device, dtype=parameter.dtype)
        inner = heads * size
        with torch.no_grad():
            small.embeddings.load_state_dict(self.embeddings.state_dict())
            small.head.load_state_dict(self.head.state_dict())
            for new, old in enumerate(layers):
                src, dst = self.layers[old], small.layers[new]
                dst.attention.qkv.weight.copy_(src.attention.qkv.weight[:3 * inner])
                dst.attention.qkv.bias.copy_(src.attention.qkv.bias[:3 * inner])
                dst.attention.output.weight.copy_(src.attention.output.weight[:, :inner])
                dst.attention.output.bias.copy_(src.attention.output.bias)
                dst.attention.norm.load_state_dict(src.attention.norm.state_dict())
                dst.ffn.up.weight.copy_(src.ffn.up.weight[:neurons])
                dst.ffn.up.bias.copy_(src.ffn.up.bias[:neurons])
                dst.ffn.down.weight.copy_(src.ffn.down.weight[:, :neurons])
                dst.ffn.down.bias.copy_(src.ffn.down.bias)
                dst.ffn.norm.load_state_dict(src.ffn.norm.state_dict())
                if str(new) in small.exits:
                    small.exits[str(new)].load_state_dict(self.exits[str(old)].state_dict())
        small.hf_config = dict(self.hf_config)
        small.metadata = {"subnetwork": {"width": width, "depth": depth, "layers": layers,
                                         "heads": heads, "neurons": neurons}}
        return small.train(self.training)

    # -- Hugging Face weights -----------------------------------------------------------------

    def hf_names(self) -> dict[str, str]:
        """Our parameter name → its name in a Hugging Face ``BertForSequenceClassification`` state dict
        (all but the fused QKV, which maps to three tensors: see ``hf_state_dict``)."""
        names = {
            "embeddings.word.weight": "bert.embeddings.word_embeddings.weight",
            "embeddings.position.weight": "bert.embeddings.position_embeddings.weight",
            "embeddings.token_type.weight": "bert.embeddings.token_type_embeddings.weight",
            "embeddings.norm.weight": "bert.embeddings.LayerNorm.weight",
            "embeddings.norm.bias": "bert.embeddings.LayerNorm.bias",
            "head.pooler.weight": "bert.pooler.dense.weight",
            "head.pooler.bias": "bert.pooler.dense.bias",
            "head.classifier.weight": "classifier.weight",
            "head.classifier.bias": "classifier.bias",
        }
        per_layer = {
            "attention.output": "attention.output.dense", "attention.norm": "attention.output.LayerNorm",
            "ffn.up": "intermediate.dense", "ffn.down": "output.dense", "ffn.norm": "output.LayerNorm",
        }
        for i in range(self.config.num_layers):
            for ours, theirs in per_layer.items():
                for kind in ("weight", "bias"):
                    names[f"layers.{i}.{ours}.{kind}"] = f"bert.encoder.layer.{i}.{theirs}.{kind}"
        return names

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone + final head as a ``BertForSequenceClassification`` state dict (no exit heads)."""
        ours = self.state_dict()
        hf = {theirs: ours[name] for name, theirs in self.hf_names().items()}
        for i in range(self.config.num_layers):
            for kind in ("weight", "bias"):
                parts = split_heads(ours[f"layers.{i}.attention.qkv.{kind}"], self.config.num_heads)
                for part, tensor in zip(("query", "key", "value"), parts):
                    hf[f"bert.encoder.layer.{i}.attention.self.{part}.{kind}"] = tensor
        return {name: tensor.detach().contiguous() for name, tensor in hf.items()}

    def load_hf_weights(self, tensors: Mapping[str, torch.Tensor], source: str,
                        optional: Iterable[str] = ()) -> list[str]:
        """Copy a ``BertModel`` or ``BertForSequenceClassification`` state dict in, checking every name and
        shape. Names may carry the ``bert.`` prefix or not. Tensors named in ``optional`` (HF names) may be
        absent: they keep their initialisation, and their names are returned. Unknown tensors are an
        error, except pretraining heads (``cls.*``) and position/token-type buffers."""
        def canonical(name: str) -> str:
            return name if name.startswith(("bert.", "classifier.")) else f"bert.{name}"

        expected = self.hf_state_dict()   # every name and shape a checkpoint of this config holds
        given = {canonical(name): tensor for name, tensor in tensors.items()}
        optional = set(optional)
        missing = [name for name in expected if name not in given and name not in optional]
        if missing:
            raise InputError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                             f"({len(missing)} in all)")
        ignorable = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids", "bert.cls.", "cls.")
        unexpected = sorted(name for name in given if name not in expected and not name.startswith(ignorable))
        if unexpected:
            raise InputError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
                             f" — not part of a {self.config.num_layers}-layer BERT cross-encoder")
        for name, target in expected.items():
            if name in given and tuple(given[name].shape) != tuple(target.shape):
                raise InputError(f"{source}: tensor {name!r} has shape {list(given[name].shape)}, "
                                 f"expected {list(target.shape)} (from the config)")
        merged = {name: given.get(name, current) for name, current in expected.items()}
        ours = {name: merged[theirs] for name, theirs in self.hf_names().items()}
        for i in range(self.config.num_layers):
            for kind in ("weight", "bias"):
                parts = [merged[f"bert.encoder.layer.{i}.attention.self.{part}.{kind}"]
                         for part in ("query", "key", "value")]
                ours[f"layers.{i}.attention.qkv.{kind}"] = interleave_heads(*parts, self.config.num_heads)
        with torch.no_grad():
            for name, target in self.state_dict().items():
                if name in ours:
                    target.copy_(ours[name].to(target.dtype))
        return [name for name in expected if name not in given]

    def reset_exits_from_final_head(self) -> None:
        """Initialise every exit head as a copy of the final head (a starting point for self-distillation;
        [CLS] exit heads, the only kind a Hugging Face checkpoint loads with)."""
        for exit_head in self.exits.values():
            exit_head.load_state_dict(self.head.state_dict())

    def new_exit_heads(self, pooling: str) -> None:
        """Replace every exit head by a freshly initialised one reading ``pooling`` (the backbone and the
        final head are untouched): what the exits training stage starts from."""
        self.config = replace(self.config, exit_pooling=pooling)
        parameter = next(self.parameters())
        self.exits = nn.ModuleDict({str(layer): RankingHead(self.config, pooling) for layer in self.config.exit_layers})
        self.exits.apply(self._init_weights)
        self.exits.to(device=parameter.device, dtype=parameter.dtype).train(self.training)

    def set_dropout(self, probability: float) -> None:
        """Every dropout of the network and its heads, hidden and attention, to ``probability`` (the config,
        and so a saved model's config.json, follows)."""
        self.config = replace(self.config, hidden_dropout=probability, attention_dropout=probability)
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = probability
            elif isinstance(module, SelfAttention):
                module.attention_dropout = probability

    @classmethod
    def blank(cls, config: ModelConfig, tokenizer=None) -> "DynamicCrossEncoder":
        """A model whose every weight is about to be overwritten, built without drawing from torch's random
        generator: cloning or loading a model in the middle of training (to evaluate it, to distill from it)
        leaves the dropout masks that follow as they were."""
        with torch.random.fork_rng(devices=[]):
            return cls(config, tokenizer=tokenizer)

    def extra_repr(self) -> str:
        c = self.config
        return (f"layers={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}x{c.head_size}, "
                f"ffn={c.intermediate_size}, exits after {list(c.exit_layers)}")

    def clone(self) -> "DynamicCrossEncoder":
        """A deep copy (weights, tokenizer reference, metadata, rewiring)."""
        twin = DynamicCrossEncoder.blank(self.config, tokenizer=self.tokenizer)
        parameter = next(self.parameters())
        twin.to(device=parameter.device, dtype=parameter.dtype)
        twin.load_state_dict(self.state_dict())
        twin.metadata = copy.deepcopy(self.metadata)
        twin.rewiring = copy.deepcopy(self.rewiring)
        twin.hf_config = copy.deepcopy(self.hf_config)
        return twin.train(self.training)

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)
