"""LM configuration: a frozen dataclass, the Moshi 7B preset, and Kyutai's ``config.json`` reader."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .transformer import TransformerConfig

logger = logging.getLogger(__name__)

# Keys of Kyutai's config.json that describe something other than the LM itself (kept in `extra`).
METADATA_KEYS = frozenset({
    "lm_gen_config", "moshi_name", "mimi_name", "tokenizer_name", "model_type", "model_id", "lora_name",
    "mimi_config", "mimi_config_name", "stt_config", "tts_config", "gradient_checkpointing", "quantize", "model_name",
})

# Options of the reference that duplex does not implement. Configs often spell them out with
# their neutral value (false, null, {}, kv_repeat 1, ...); only a value that switches the
# option on is refused (see ``_unsupported_options``).
UNSUPPORTED_KEYS = frozenset({
    "conditioners", "fuser", "cross_attention", "demux_second_stream", "extra_heads_num_heads",
    "extra_heads_dim", "norm_emb", "bias_proj", "bias_ff", "bias_attn", "text_card_out", "lora",
    "depformer_cross_attention", "kv_repeat",
})
_FUSER_INPUTS = ("sum", "prepend", "cross", "input_interpolate")  # fuser entries that route conditions

# Temporal options the depth transformer inherits unless a depformer_* key overrides them.
_INHERITED = ("num_heads", "num_layers", "layer_scale", "max_period", "gating")


@dataclass(frozen=True)
class LMConfig:
    """Everything needed to build a Moshi-style LM. The defaults are Kyutai's for absent keys."""

    delays: tuple[int, ...]
    dim: int = 4096
    text_card: int = 32000
    existing_text_padding_id: int | None = 3
    existing_text_end_padding_id: int = 0
    n_q: int = 16
    dep_q: int = 8
    card: int = 2048
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.0
    causal: bool = True
    layer_scale: float | None = None
    context: int | None = None
    max_period: float = 10000.0
    gating: str = "none"
    norm: str = "layer_norm"
    positional_embedding: str = "sin"
    depformer_dim: int = 1024
    depformer_dim_feedforward: int | None = None
    depformer_num_heads: int | None = None
    depformer_num_layers: int | None = None
    depformer_layer_scale: float | None = None
    depformer_max_period: float | None = None
    depformer_gating: str | None = None
    depformer_context: int | None = None
    depformer_multi_linear: bool = False
    depformer_pos_emb: str = "sin"
    depformer_weights_per_step: bool = False
    depformer_weights_per_step_schedule: tuple[int, ...] | None = None
    depformer_low_rank_embeddings: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "delays", tuple(int(d) for d in self.delays))
        if self.depformer_weights_per_step_schedule is not None:
            object.__setattr__(self, "depformer_weights_per_step_schedule",
                               tuple(int(s) for s in self.depformer_weights_per_step_schedule))
        object.__setattr__(self, "extra", dict(self.extra))  # a copy: the caller's dict stays theirs
        self._validate()

    def _validate(self) -> None:
        if len(self.delays) != self.n_q + 1:
            raise ValueError(f"delays must have n_q + 1 = {self.n_q + 1} entries (text + audio), "
                             f"got {len(self.delays)}")
        if any(d < 0 for d in self.delays):
            raise ValueError(f"delays must be >= 0, got {list(self.delays)}")
        if not 0 < self.dep_q <= self.n_q:
            raise ValueError(f"dep_q must be in 1..n_q={self.n_q}, got {self.dep_q}")
        if not self.causal:
            raise ValueError("a non-causal LM cannot stream; causal must be true")
        schedule = self.depformer_weights_per_step_schedule
        if schedule is not None:
            if not self.depformer_weights_per_step:
                raise ValueError("depformer_weights_per_step_schedule needs depformer_weights_per_step")
            if len(schedule) != self.dep_q or min(schedule) < 0:
                raise ValueError(f"depformer_weights_per_step_schedule must hold dep_q={self.dep_q} "
                                 f"indices >= 0, got {list(schedule)}")
        # Building the transformer configs checks norm / gating / positions / heads.
        self.temporal_config()
        self.depformer_config()

    # ----------------------------------------------------------------- derived sizes
    @property
    def num_codebooks(self) -> int:
        """Streams per frame: the text stream plus n_q audio codebooks."""
        return self.n_q + 1

    @property
    def num_user_codebooks(self) -> int:
        """Audio codebooks that come from the user (not generated): n_q - dep_q."""
        return self.n_q - self.dep_q

    @property
    def max_delay(self) -> int:
        return max(self.delays)

    @property
    def text_out_card(self) -> int:
        """Text logits: text_card, plus one padding id when the tokenizer has none of its own."""
        return self.text_card + (1 if self.existing_text_padding_id is None else 0)

    @property
    def num_depformer_inputs(self) -> int:
        """How many depformer_in projections exist."""
        if not self.depformer_multi_linear:
            return 1
        if self.depformer_weights_per_step_schedule is not None:
            return max(self.depformer_weights_per_step_schedule) + 1
        return self.dep_q

    def depformer_input_index(self, codebook: int) -> int:
        """Which depformer_in projection feeds model codebook ``codebook`` (0-based)."""
        if not self.depformer_multi_linear:
            return 0
        if self.depformer_weights_per_step_schedule is not None:
            return self.depformer_weights_per_step_schedule[codebook]
        return codebook

    def temporal_config(self) -> TransformerConfig:
        """The temporal (per-frame) transformer."""
        return TransformerConfig(
            d_model=self.dim, num_heads=self.num_heads, num_layers=self.num_layers,
            dim_feedforward=int(self.hidden_scale * self.dim), context=self.context, causal=self.causal,
            norm=self.norm, gating=self.gating, positional_embedding=self.positional_embedding,
            max_period=float(self.max_period), layer_scale=self.layer_scale)

    def depformer_config(self) -> TransformerConfig:
        """The depth transformer, run over the dep_q codebooks of one frame."""
        def pick(value, fallback):
            return fallback if value is None else value

        feedforward = self.depformer_dim_feedforward
        if feedforward is None:
            feedforward = int(self.hidden_scale * self.depformer_dim)
        return TransformerConfig(
            d_model=self.depformer_dim,
            num_heads=pick(self.depformer_num_heads, self.num_heads),
            num_layers=pick(self.depformer_num_layers, self.num_layers),
            dim_feedforward=feedforward, context=self.depformer_context, causal=True, norm=self.norm,
            gating=pick(self.depformer_gating, self.gating), positional_embedding=self.depformer_pos_emb,
            max_period=float(pick(self.depformer_max_period, self.max_period)),
            layer_scale=self.depformer_layer_scale,
            weights_per_step=self.dep_q if self.depformer_weights_per_step else 0,
            weights_per_step_schedule=self.depformer_weights_per_step_schedule)

    # ----------------------------------------------------------------- presets and readers
    @classmethod
    def moshi_7b(cls) -> "LMConfig":
        """The published Moshi 7B LM (kyutai/moshiko-pytorch-bf16)."""
        return cls(
            delays=(0, 0) + (1,) * 7 + (0,) + (1,) * 7, dim=4096, text_card=32000, existing_text_padding_id=3,
            n_q=16, dep_q=8, card=2048, num_heads=32, num_layers=32, hidden_scale=4.125, layer_scale=None,
            context=3000, max_period=10000.0, gating="silu", norm="rms_norm_f32", positional_embedding="rope",
            depformer_dim=1024, depformer_dim_feedforward=4224, depformer_num_heads=16, depformer_num_layers=6,
            depformer_layer_scale=None, depformer_max_period=10000.0, depformer_gating="silu",
            depformer_context=8, depformer_multi_linear=True, depformer_pos_emb="none",
            depformer_weights_per_step=True)

    @classmethod
    def from_kyutai(cls, source: Mapping[str, Any] | str | Path) -> "LMConfig":
        """Read Kyutai's LM ``config.json`` schema (a dict, or the path of a JSON file)."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            try:
                source = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read LM config {path}: {err}") from err
        if not isinstance(source, Mapping):
            raise ValueError(f"an LM config must be a JSON object, got {type(source).__name__}")
        return cls(**_kyutai_kwargs(dict(source)))


def _is_off(value: Any) -> bool:
    """Whether a flag-like option is switched off (None, False, 0 and empty containers)."""
    return value is None or value is False or value == 0 or value == {} or value == []


def _is_neutral(key: str, value: Any, raw: Mapping[str, Any]) -> bool:
    """Whether an unsupported option's value leaves the model as the plain Moshi LM."""
    if key == "kv_repeat":  # key/value heads shared by kv_repeat query heads: 1 = ordinary attention
        return value is None or value == 1
    if key == "extra_heads_dim":  # the size of heads that exist only with extra_heads_num_heads > 0
        return _is_off(raw.get("extra_heads_num_heads"))
    if key == "text_card_out":  # the text head's size: neutral when it is the usual one
        text_card = raw.get("text_card", LMConfig.text_card)
        padding = raw.get("existing_text_padding_id", LMConfig.existing_text_padding_id)
        return value is None or value == text_card + (1 if padding is None else 0)
    if key == "fuser" and isinstance(value, Mapping):  # fuser settings that route no condition anywhere
        return all(_is_off(value.get(name)) for name in _FUSER_INPUTS)
    return _is_off(value)


def _unsupported_options(raw: Mapping[str, Any]) -> list[str]:
    """The unsupported options that raw switches on, as ``key=value`` (sorted)."""
    return [f"{key}={raw[key]!r}" for key in sorted(UNSUPPORTED_KEYS)
            if key in raw and not _is_neutral(key, raw[key], raw)]


def _kyutai_kwargs(raw: dict[str, Any]) -> dict[str, Any]:
    """Map a Kyutai config dict onto LMConfig keyword arguments (refusing what is unsupported)."""
    refused = _unsupported_options(raw)
    if refused:
        raise ValueError(f"unsupported LM option(s) {', '.join(refused)}: duplex implements the "
                         "unconditioned Moshi LM only")
    if "delays" not in raw:
        raise ValueError("the LM config has no 'delays' (one acoustic delay per stream)")
    if not raw.pop("depformer_causal", True):
        raise ValueError("depformer_causal false is not supported: the depth transformer must be causal")
    known = {f.name for f in fields(LMConfig)} - {"extra"}
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if key in known:
            kwargs[key] = value
        elif key in UNSUPPORTED_KEYS:
            continue  # present but switched off
        else:
            if key not in METADATA_KEYS:
                logger.warning("LM config key %r is not an LM option duplex knows; kept in config.extra", key)
            extra[key] = value
    # Depth-transformer options inherit the temporal value only when their key is absent
    # (an explicit null, e.g. "depformer_layer_scale": null, means "none").
    for name in _INHERITED:
        dep_key = f"depformer_{name}"
        if dep_key not in raw and name in kwargs:
            kwargs[dep_key] = kwargs[name]
    for key in ("delays", "depformer_weights_per_step_schedule"):
        if kwargs.get(key) is not None:
            kwargs[key] = tuple(kwargs[key])
    kwargs["extra"] = extra
    return kwargs
