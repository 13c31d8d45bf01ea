"""LoRA adapters in upstream's format (moshi / moshi-finetune): reading, checking, merging, saving.

An adapter is a ``lora.safetensors`` with, for every ``nn.Linear`` of the LM at module path
``<path>``, ``<path>.lora_A.weight`` [r, in] and ``<path>.lora_B.weight`` [out, r], and a
``config.json`` beside it with ``lora`` (true), ``lora_rank`` and ``lora_scaling``. Semantics:
``y = W x + scaling * B (A x)``; merged: ``W' = W + scaling * (B @ A)`` (``scaling`` is a plain
multiplier, not alpha / rank).

Attention projections come in two spellings (see ``duplex.model.spelling``): per step
(``...self_attn.in_projs.{i}``), which the modules use, or fused over the weight sets
(``...self_attn.in_proj`` with A [r, D] and B [sets * 3D, r]; ``...self_attn.out_proj`` with
B [sets * D, r]). A fused pair maps onto the per-step modules: A shared, B split by rows.

Reading is strict: every linear of the LM must have both halves, no key may name anything else,
every shape is checked against the LM and the rank; all problems are reported in one error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import MAX_LISTED_KEYS, safetensors_shapes
from .lora_layers import LORA_WRAPPERS

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
ADAPTER_FILE = "lora.safetensors"
_FUSED = re.compile(r"^(?P<attention>.+\.self_attn)\.(?P<kind>in_proj|out_proj)$")
_PER_STEP_KIND = {"in_proj": "in_projs", "out_proj": "out_projs"}

Shape = tuple[int, ...]


class AdapterError(ValueError):
    """An adapter file or its config does not fit the LM (the message names every problem)."""


@dataclass(frozen=True)
class LoRAConfig:
    """The adapter keys of an upstream ``config.json``."""

    rank: int
    scaling: float

    def to_json(self) -> dict:
        return {"lora": True, "lora_rank": self.rank, "lora_scaling": self.scaling}


@dataclass
class LoRAAdapter:
    """One adapter's weights, keyed by the LM's own (per-step) module paths.

    pairs: path -> (A [r, in], B [out, r]), float32 on the CPU.
    """

    name: str
    config: LoRAConfig
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def scaling(self) -> float:
        return self.config.scaling


def linear_targets(lm: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of the LM an adapter applies to: module path -> module.

    A module already wrapped by a LoRA layer is listed under the wrapper's path.
    """
    targets: dict[str, nn.Module] = {}
    wrapped_bases = set()
    for path, module in lm.named_modules():
        if isinstance(module, LORA_WRAPPERS):
            targets[path] = module
            wrapped_bases.add(id(module.base))
        elif isinstance(module, nn.Linear) and id(module) not in wrapped_bases:
            targets[path] = module
    return targets


def _io_features(module: nn.Module) -> tuple[int, int]:
    return module.in_features, module.out_features


def read_lora_config(path: str | Path) -> LoRAConfig:
    """The ``lora_rank`` / ``lora_scaling`` of an adapter's config.json (``lora`` must be true)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter config not found: {path} (an adapter needs its config.json beside it)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"cannot read adapter config {path}: {err}") from err
    if not isinstance(raw, dict) or raw.get("lora") is not True:
        raise AdapterError(f"{path} is not a LoRA adapter config (it needs \"lora\": true)")
    rank, scaling = raw.get("lora_rank"), raw.get("lora_scaling")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"{path}: lora_rank must be a positive integer, got {rank!r}")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise AdapterError(f"{path}: lora_scaling must be a number, got {scaling!r}")
    return LoRAConfig(rank=rank, scaling=float(scaling))


def adapter_paths(spec: str | Path) -> tuple[Path, Path]:
    """(weights, config.json) of an adapter given as its safetensors file or its folder."""
    path = Path(spec)
    if path.is_dir():
        path = path / ADAPTER_FILE
    return path, path.with_name("config.json")


@dataclass
class _Plan:
    """How the file's keys map onto the LM: per target, the A key, the B key and the B row range."""

    pieces: dict[str, tuple[str, str, int, int]]


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_KEYS])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_LISTED_KEYS else "")


def _pair_prefixes(shapes: dict[str, Shape], problems: list[str]) -> dict[str, tuple[Shape, Shape]]:
    """Group the file's keys into (A shape, B shape) per prefix; half pairs and strays are problems."""
    halves: dict[str, dict[str, Shape]] = {}
    strays = []
    for key, shape in shapes.items():
        for suffix, half in ((A_SUFFIX, "A"), (B_SUFFIX, "B")):
            if key.endswith(suffix):
                halves.setdefault(key[: -len(suffix)], {})[half] = shape
                break
        else:
            strays.append(key)
    if strays:
        problems.append(f"{len(strays)} key(s) that are not lora_A / lora_B weights: {_listed(sorted(strays))}")
    lonely = sorted(f"{prefix} (no lora_{'B' if 'A' in h else 'A'})" for prefix, h in halves.items() if len(h) < 2)
    if lonely:
        problems.append(f"{len(lonely)} half pair(s): {_listed(lonely)}")
    return {prefix: (h["A"], h["B"]) for prefix, h in halves.items() if len(h) == 2}


def _fused_members(prefix: str, targets: dict[str, nn.Module]) -> list[str]:
    """The per-step targets a fused attention prefix stands for ([] when it is not one)."""
    match = _FUSED.match(prefix)
    if not match:
        return []
    base = f"{match['attention']}.{_PER_STEP_KIND[match['kind']]}."
    members = []
    while f"{base}{len(members)}" in targets:
        members.append(f"{base}{len(members)}")
    return members


def plan_adapter(shapes: dict[str, Shape], targets: dict[str, nn.Module], rank: int, source: str) -> _Plan:
    """Check a file's key -> shape against the LM's linears; raise one AdapterError naming every problem."""
    problems: list[str] = []
    pairs = _pair_prefixes(shapes, problems)
    pieces: dict[str, tuple[str, str, int, int]] = {}
    unknown, misshaped = [], []
    named: set[str] = set()  # targets the file names (half pairs and mis-shaped ones included)
    for key in shapes:
        for suffix in (A_SUFFIX, B_SUFFIX):
            if key.endswith(suffix):
                prefix = key[: -len(suffix)]
                named.update([prefix] if prefix in targets else _fused_members(prefix, targets))
    for prefix, (a_shape, b_shape) in sorted(pairs.items()):
        members = [prefix] if prefix in targets else _fused_members(prefix, targets)
        if not members:
            unknown.append(prefix)
            continue
        features = [_io_features(targets[m]) for m in members]
        in_features, out_rows = features[0][0], sum(out for _, out in features)
        expected_a, expected_b = (rank, in_features), (out_rows, rank)
        if tuple(a_shape) != expected_a or tuple(b_shape) != expected_b:
            misshaped.append(f"{prefix} (lora_A {tuple(a_shape)}, lora_B {tuple(b_shape)}; "
                             f"expected {expected_a}, {expected_b})")
            continue
        start = 0
        for member, (_, out) in zip(members, features):
            if member in pieces:
                problems.append(f"{member} is given twice (fused and per-step spellings)")
            pieces[member] = (prefix + A_SUFFIX, prefix + B_SUFFIX, start, start + out)
            start += out
    missing = sorted(set(targets) - named)
    for title, items in (("unknown target(s) (not a linear layer of this LM)", unknown),
                         ("mis-shaped pair(s)", misshaped), ("linear layer(s) without an adapter", missing)):
        if items:
            problems.append(f"{len(items)} {title}: {_listed(items)}")
    if problems:
        raise AdapterError(f"{source} does not fit this LM (rank {rank}): " + "; ".join(problems))
    return _Plan(pieces)


def read_adapter(spec: str | Path, lm: nn.Module, name: str | None = None) -> LoRAAdapter:
    """Read and strictly check an adapter (its safetensors file or folder, config.json beside it)."""
    from safetensors import safe_open

    weights, config_path = adapter_paths(spec)
    config = read_lora_config(config_path)
    source = f"the adapter {weights}"
    try:
        shapes = safetensors_shapes(weights, "adapter weights")
    except (FileNotFoundError, ValueError) as err:
        raise AdapterError(str(err)) from err
    plan = plan_adapter(shapes, linear_targets(lm), config.rank, source)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with safe_open(str(weights), framework="pt", device="cpu") as handle:
        loaded: dict[str, torch.Tensor] = {}

        def get(key: str) -> torch.Tensor:
            if key not in loaded:
                loaded[key] = handle.get_tensor(key).float()
            return loaded[key]

        for target, (a_key, b_key, start, stop) in plan.pieces.items():
            pairs[target] = (get(a_key), get(b_key)[start:stop].contiguous())
    return LoRAAdapter(name=name or weights.parent.name or weights.stem, config=config, pairs=pairs)


@torch.no_grad()
def merge_adapter(lm: nn.Module, adapter: LoRAAdapter) -> int:
    """W += scaling * B @ A for every target (computed in float32): zero cost per step afterwards."""
    targets = linear_targets(lm)
    for path, (a, b) in adapter.pairs.items():
        module = targets[path]
        weight = module.base.weight if hasattr(module, "base") else module.weight
        if not weight.is_floating_point():
            raise AdapterError(f"cannot merge an adapter into {path}: its weight is {weight.dtype} "
                               "(merge before quantizing)")
        delta = adapter.scaling * (b.to(weight.device).float() @ a.to(weight.device).float())  # [out, in]
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(adapter.pairs)


def merge_adapter_file(lm: nn.Module, spec: str | Path) -> LoRAAdapter:
    """``--lora-weight``: read an adapter strictly and merge it into the LM's weights."""
    adapter = read_adapter(spec, lm)
    merge_adapter(lm, adapter)
    return adapter


def save_adapter(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], config: LoRAConfig, out_dir: str | Path,
                 base_config: dict | None = None) -> Path:
    """Write ``lora.safetensors`` (per-step spelling) and ``config.json`` (the LM's config + lora keys)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (a, b) in sorted(pairs.items()):
        tensors[path + A_SUFFIX] = a.detach().float().contiguous().cpu()
        tensors[path + B_SUFFIX] = b.detach().float().contiguous().cpu()
    weights = out_dir / ADAPTER_FILE
    save_file(tensors, str(weights))
    raw = {key: value for key, value in (base_config or {}).items() if not key.startswith("lora")}
    (out_dir / "config.json").write_text(json.dumps({**raw, **config.to_json()}, indent=2) + "\n")
    return weights


def lm_config_keys(raw: dict) -> dict:
    """An adapter's config.json without its adapter keys: the LM config it was trained on."""
    return {key: value for key, value in raw.items() if key not in ("lora", "lora_rank", "lora_scaling", "lora_name")}
