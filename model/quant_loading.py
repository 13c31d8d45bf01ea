"""Loading an LM with quantized linear layers: Kyutai's q8 files, and int8 / int4 quantize-on-load.

The model is built on ``meta``; the checkpoint is checked from its header (keys, spelling,
shapes, and for q8 files every ``<key>_scb`` scale) before any tensor is read; then tensors are
read one at a time. A linear weight becomes a quantized layer as soon as it is read (a fused
attention tensor is split into its per-step layers first), so the float model never exists in
memory: the peak is the quantized model plus one float tensor.

What stays floating point (see the README "Quantization"): token embeddings (table lookups, not
matrix products) and norms / layer scales (vectors). Every ``nn.Linear`` is quantized, output
heads and depth transformer included: the measured logit error is dominated by the temporal
transformer's layers, and the heads hold 2 % of the 7B's weights.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointMismatchError, check_checkpoint_keys, describe_source, tensor_shapes
from .config import LMConfig
from .lm import LMModel
from .quant import (
    INT4_GROUP_SIZE,
    Int8Linear,
    QuantizeError,
    check_mode,
    quantize_weight,
    weight_bytes,
)
from .quant_reader import TensorReader
from .spelling import fused_groups, shapes_in_file_spelling

logger = logging.getLogger(__name__)

WeightHook = Callable[[str, torch.Tensor], torch.Tensor]
SCALE_SUFFIX = "_scb"  # Kyutai q8: <weight key>_scb, float32 [out] = absmax of each row


def config_quantize_flag(config: LMConfig) -> bool:
    """The config's ``quantize`` entry (Kyutai q8 repos say true); a clear error for other values."""
    value = config.extra.get("quantize", False)
    if value in (None, False, True):
        return bool(value)
    raise QuantizeError(f"unknown quantize value {value!r} in the LM config: Kyutai's q8 configs say "
                        "\"quantize\": true")


def is_q8_checkpoint(weights: str | Path | Mapping[str, torch.Tensor]) -> bool:
    """Whether a checkpoint holds q8 scales (``<key>_scb``); reads the header only."""
    keys = weights.keys() if isinstance(weights, Mapping) else TensorReader(weights).shapes
    return any(key.endswith(SCALE_SUFFIX) for key in keys)


def needs_quantized_loading(weights, config: LMConfig, quantize: str | None) -> bool:
    """Whether ``load_lm`` must go through ``load_quantized_lm``."""
    check_mode(quantize)
    return quantize is not None or config_quantize_flag(config) or is_q8_checkpoint(weights)


def fast_compute_dtype(dtype: torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype the serving commands run quantized layers in: bfloat16 for a float32 model on the CPU.

    PyTorch's CPU int8 / int4 kernels are 5-10x slower on float32 activations than on bfloat16
    ones (README "Quantization"), while the rest of the step (attention above all) is faster in
    float32: a float32 model whose quantized layers cast their input to bfloat16 is the fastest
    CPU configuration measured. Elsewhere: the model's dtype.
    """
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        return torch.bfloat16
    return dtype


# ----------------------------------------------------------------- the header check
def _linear_keys(model: nn.Module) -> dict[str, str]:
    """Module-spelling weight key -> module name, for every nn.Linear of the model."""
    return {f"{name}.weight": name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _file_linear_groups(model: nn.Module, file_keys: set[str]) -> dict[str, list[str]]:
    """File weight key -> the module names it fills, in row order (fused keys fill several)."""
    linear = _linear_keys(model)
    groups: dict[str, list[str]] = {}
    for group in fused_groups(linear):
        if group.fused_key in file_keys:
            groups[group.fused_key] = [linear.pop(key) for key in group.step_keys]
    for key, name in linear.items():
        groups[key] = [name]
    return groups


def _check_scales(reader: TensorReader, linear_groups: Mapping[str, list[str]], source: str) -> None:
    """Every int8 tensor is a linear weight with a float [out] ``_scb``; every ``_scb`` has its weight."""
    problems = []
    for key, dtype in reader.dtypes.items():
        if key.endswith(SCALE_SUFFIX):
            base = key[:-len(SCALE_SUFFIX)]
            if base not in linear_groups:
                problems.append(f"{key} scales no linear weight of the model")
            elif reader.dtypes[base] != torch.int8:
                problems.append(f"{key} scales {base}, which is {reader.dtypes[base]}, not int8")
            elif reader.shapes[key] != (reader.shapes[base][0],):
                problems.append(f"{key} has shape {reader.shapes[key]}, expected ({reader.shapes[base][0]},) "
                                f"(one scale per row of {base} {reader.shapes[base]})")
            elif not dtype.is_floating_point:
                problems.append(f"{key} is {dtype}, expected a floating-point scale")
        elif dtype == torch.int8:
            if key not in linear_groups:
                problems.append(f"{key} is int8 but only linear weights can be quantized")
            elif key + SCALE_SUFFIX not in reader.dtypes:
                problems.append(f"{key} is int8 but its scale {key + SCALE_SUFFIX} is missing")
    if problems:
        raise CheckpointMismatchError(f"{source} is not a valid q8 checkpoint: " + "; ".join(problems[:8])
                                      + (f" ({len(problems)} problems in all)" if len(problems) > 8 else ""))


def check_quantized_checkpoint(model: nn.Module, reader: TensorReader, source: str) -> dict[str, list[str]]:
    """The strict check of ``load_strict`` plus the q8 rules; returns the file's linear groups."""
    weight_shapes = {k: v for k, v in reader.shapes.items() if not k.endswith(SCALE_SUFFIX)}
    internal = tensor_shapes(model.state_dict())
    try:
        expected = shapes_in_file_spelling(internal, weight_shapes, source)
    except ValueError as err:
        raise CheckpointMismatchError(str(err)) from err
    check_checkpoint_keys(expected, weight_shapes, source)
    groups = _file_linear_groups(model, set(weight_shapes))
    _check_scales(reader, groups, source)
    return groups


# ----------------------------------------------------------------- loading
def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = key.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _float_linear(weight: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


class _LayerBuilder:
    """Turns one file weight (float or q8) into the layer(s) it fills, on the target device."""

    def __init__(self, quantize: str | None, device: torch.device, dtype: torch.dtype,
                 compute_dtype: torch.dtype, group_size: int, weight_hook: WeightHook | None = None) -> None:
        self.quantize, self.device, self.dtype = quantize, device, dtype
        self.compute_dtype, self.group_size = compute_dtype, group_size
        self.weight_hook = weight_hook
        self.kinds: Counter[str] = Counter()

    def build(self, name: str, weight: torch.Tensor, scb: torch.Tensor | None) -> nn.Module:
        """weight [N, K] (int8 with scb [N], or float) of module ``name`` -> the layer."""
        if scb is not None and self.quantize in (None, "int8") and self.weight_hook is None:
            layer = Int8Linear(weight.to(self.device), scb.to(self.device, torch.float32) / 127.0, self.compute_dtype)
        else:
            if scb is not None:  # q8 -> int4 (or hooked): through the float32 weight of this layer only
                weight = weight.to(self.device).float() * (scb.to(self.device, torch.float32) / 127.0)[:, None]
            if self.weight_hook is not None:  # e.g. a LoRA merge, before quantizing
                weight = self.weight_hook(name, weight.to(self.device))
            if self.quantize is None and scb is None:
                layer = _float_linear(weight.to(self.device, self.dtype))
            else:
                layer = quantize_weight(weight, self.quantize or "int8", self.compute_dtype, self.device,
                                        self.group_size)
        self.kinds[type(layer).__name__] += 1
        return layer


def load_quantized_lm(weights: str | Path | Mapping[str, torch.Tensor] | TensorReader, config: LMConfig,
                      device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                      quantize: str | None = None, group_size: int = INT4_GROUP_SIZE,
                      compute_dtype: torch.dtype | None = None, weight_hook: WeightHook | None = None) -> LMModel:
    """Load ``weights`` (a q8 or float checkpoint, either spelling) with quantized linear layers.

    quantize: None keeps a q8 file's int8 layers as they are (and a float file float), "int8" /
    "int4" quantize every float linear weight while it is read (a q8 file's int8 weights are
    already int8; with "int4" they are re-quantized). dtype: the floating tensors' dtype;
    compute_dtype: the dtype quantized layers compute in (default: ``dtype``). weight_hook(name,
    weight [N, K]) -> weight: applied to every linear weight, in float, before it is quantized
    (e.g. merging a LoRA adapter, layer by layer).
    """
    check_mode(quantize)
    config_quantize_flag(config)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.device(device)
    compute_dtype = compute_dtype or dtype  # exact weight-only semantics unless asked otherwise
    if isinstance(weights, TensorReader):  # e.g. the 7B memory measurement's random checkpoint
        reader, source = weights, f"the LM checkpoint {weights.what}"
    else:
        reader, source = TensorReader(weights), describe_source(weights, "LM")
    if config_quantize_flag(config) and not any(key.endswith(SCALE_SUFFIX) for key in reader.shapes):
        raise CheckpointMismatchError(f"the LM config says \"quantize\": true but {source} holds no q8 scales "
                                      f"(<key>{SCALE_SUFFIX}): is it the q8 weights file?")
    with torch.device("meta"):
        model = LMModel(config)
    groups = check_quantized_checkpoint(model, reader, source)
    builder = _LayerBuilder(quantize, device, dtype, compute_dtype, group_size, weight_hook)
    for key in reader.keys():
        if key.endswith(SCALE_SUFFIX):
            continue  # read with its weight
        tensor = reader.get(key)
        if key in groups:
            _load_linear(model, groups[key], tensor, reader.get(key + SCALE_SUFFIX)
                         if key + SCALE_SUFFIX in reader.shapes else None, builder)
        else:
            cast = dtype if tensor.is_floating_point() else tensor.dtype
            _set_tensor(model, key, tensor.to(device=device, dtype=cast))
        del tensor
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointMismatchError(f"tensors left unloaded after loading: {', '.join(leftover[:8])}")
    model.eval()
    logger.info("LM loaded with quantized layers (%s): %s; weights %.1f MB on %s",
                quantize or "as stored", dict(builder.kinds), weight_bytes(model) / 2**20, device)
    return model


def _load_linear(model: nn.Module, names: list[str], weight: torch.Tensor, scb: torch.Tensor | None,
                 builder: _LayerBuilder) -> None:
    """Fill the layers ``names`` from weight [len(names) * N, K] (row blocks in step order)."""
    rows = weight.shape[0] // len(names)
    weights = torch.split(weight, rows, dim=0)
    scales = torch.split(scb, rows, dim=0) if scb is not None else [None] * len(names)
    for name, piece, scale in zip(names, weights, scales, strict=True):
        model.set_submodule(name, builder.build(name, piece, scale))
