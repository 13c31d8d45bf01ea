"""Several adapters in one batched step: a per-slot adapter choice shared by every wrapped linear.

``attach_adapters(lm, adapters, batch_size)`` swaps every linear of the LM for a
``MultiLoRALinear`` that holds the stacked A / B of all adapters and returns an ``AdapterSet``
(also kept as ``lm.adapter_set``, where ``DuplexEngine`` finds it): the name registry
(``index_of``) and the ``AdapterSelection``s (slot -> adapter, a device tensor [B]). Each engine
owns one, updates it when a slot starts (``engine.join(slot, request, adapter=NAME)``) and puts it
in force before its step (``activate``, per thread). Index 0 is the base model.

Row mapping: a linear sees x [R, ...]. R <= B: row i is slot i (the generation step, temporal and
depth transformer and heads alike; R < B: the engine's bucketed step over the first R slots).
R == k * B: slot-major rows (the teacher-forced depth pass reshapes [B, T] into B * T rows). ``use_rows(slots)`` overrides this for a step that runs a
subset of the slots (row i is slot ``slots[i]``).

Two products compute the same delta; the choice is made on the host per step, never by syncing:
``gather`` picks each row's A / B (cost grows with the rows), ``concat`` multiplies by every
adapter's A at once and masks the columns of the others (cost grows with the adapters).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .lora import AdapterError, LoRAAdapter, LoRAConfig, linear_targets
from .lora_layers import LoRALinear, MultiLoRALinear, replace_module, unwrap


class UnknownAdapterError(ValueError):
    """A request named an adapter the server does not have."""


@dataclass
class Route:
    """What a MultiLoRALinear needs for one row count (derived once per step and row count)."""

    gather: bool
    adapter: torch.Tensor  # [R] adapter index of each row (0 = none)
    row_scale: torch.Tensor  # [R] the row's adapter scaling (0 for none)
    column_scale: torch.Tensor  # [R, N * r] scaling on the row's own adapter's columns, else 0


class AdapterSelection:
    """Which adapter each slot uses: ``slot_adapter`` [B] on the device, mirrored on the host."""

    def __init__(self, batch_size: int, scales: torch.Tensor, rank: int, strategy: str = "auto") -> None:
        if strategy not in ("auto", "gather", "concat"):
            raise ValueError(f"strategy must be auto, gather or concat, got {strategy!r}")
        self.batch_size = batch_size
        self.rank = rank
        self.strategy = strategy
        self.scales = scales  # [N + 1] per adapter (0 for index 0)
        device = scales.device
        self.slot_adapter = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self.host = np.zeros(batch_size, dtype=np.int64)  # [B] mirror: is any adapter in use?
        # Adapter of each column of the concatenated products (index 0, no adapter, has none): [N r]
        self.column_owner = torch.arange(1, scales.shape[0], device=device).repeat_interleave(rank)
        self.rows: torch.Tensor | None = None
        self._routes: dict[int, Route | None] = {}

    @property
    def num_adapters(self) -> int:
        return self.scales.shape[0] - 1

    def set_slot(self, slot: int, index: int) -> None:
        """Slot ``slot`` uses adapter ``index`` from now on (0 = base). No host sync."""
        if not 0 <= slot < self.batch_size:
            raise ValueError(f"slot must be in 0..{self.batch_size - 1}, got {slot}")
        if not 0 <= index <= self.num_adapters:
            raise ValueError(f"adapter index must be in 0..{self.num_adapters}, got {index}")
        if self.host[slot] != index:
            self.host[slot] = index
            self.slot_adapter[slot] = index  # a host-to-device write, no sync
            self._routes.clear()

    def clear(self) -> None:
        """Every slot back to the base model."""
        self.host[:] = 0
        self.slot_adapter.zero_()
        self._routes.clear()

    def use_rows(self, slots: torch.Tensor | None) -> None:
        """Rows of the coming calls are the slots ``slots`` [R] (None: row i is slot i)."""
        self.rows = slots
        self._routes.clear()

    def route(self, rows: int) -> Route | None:
        if rows not in self._routes:
            self._routes[rows] = self._build_route(rows)
        return self._routes[rows]

    def _build_route(self, rows: int) -> Route | None:
        if not self.host.any():
            return None
        if self.rows is not None:
            if rows != self.rows.shape[0]:
                raise ValueError(f"{rows} rows for a step over {self.rows.shape[0]} selected slots")
            adapter = self.slot_adapter[self.rows]
        elif rows == self.batch_size:
            adapter = self.slot_adapter
        elif rows < self.batch_size:  # a step over the first ``rows`` slots (the engine's buckets)
            adapter = self.slot_adapter[:rows]
        elif rows % self.batch_size == 0:
            adapter = self.slot_adapter.repeat_interleave(rows // self.batch_size)  # slot-major rows
        else:
            raise ValueError(f"cannot map {rows} rows onto {self.batch_size} slots")
        gather = self.strategy == "gather" or (self.strategy == "auto" and rows < self.num_adapters + 1)
        row_scale = self.scales[adapter]  # [R]
        column_scale = (adapter[:, None] == self.column_owner[None, :]) * self.scales[self.column_owner][None, :]
        return Route(gather=gather, adapter=adapter, row_scale=row_scale, column_scale=column_scale)


class AdapterSet:
    """The adapters attached to an LM: names -> index (1..N) and which selection is in force.

    Each engine owns an ``AdapterSelection`` for its batch (``new_selection``) and ``activate``s it
    before its step; the selection in force is per thread, so two engines sharing one LM (even in
    two threads) never see each other's slots. Without an activation, ``selection`` (the default
    one, sized at attach time) is in force.
    """

    def __init__(self, names: list[str], scales: torch.Tensor, rank: int, strategy: str, batch_size: int) -> None:
        self.names = list(names)
        self.scales = scales  # [N + 1]
        self.rank = rank
        self.strategy = strategy
        self.selection = self.new_selection(batch_size)
        self._local = threading.local()

    def new_selection(self, batch_size: int) -> AdapterSelection:
        """A selection for a batch of ``batch_size`` slots, every slot on the base model."""
        return AdapterSelection(batch_size, self.scales, self.rank, self.strategy)

    def activate(self, selection: AdapterSelection | None) -> None:
        """Use ``selection`` for this thread's coming steps (None: the default selection)."""
        self._local.selection = selection

    def current(self) -> AdapterSelection:
        return getattr(self._local, "selection", None) or self.selection

    def index_of(self, name: str | None) -> int:
        """0 for None (the base model); UnknownAdapterError naming ``name`` for an unknown one."""
        if name is None:
            return 0
        if name not in self.names:
            known = ", ".join(self.names) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r} (this server has: {known})")
        return 1 + self.names.index(name)

    def select(self, slot: int, name: str | None) -> None:
        """Slot ``slot`` of the default selection uses adapter ``name``."""
        self.selection.set_slot(slot, self.index_of(name))


def _stack(adapters: list[LoRAAdapter], path: str, rank: int, in_features: int, out_features: int,
           device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """a_stack [N + 1, r, in], bt_stack [N + 1, r, out] for one linear (index 0 and padding zero)."""
    a_stack = torch.zeros(len(adapters) + 1, rank, in_features)
    bt_stack = torch.zeros(len(adapters) + 1, rank, out_features)
    for index, adapter in enumerate(adapters, 1):
        a, b = adapter.pairs[path]
        a_stack[index, : a.shape[0]] = a
        bt_stack[index, : b.shape[1]] = b.t()
    return a_stack.to(device=device, dtype=dtype), bt_stack.to(device=device, dtype=dtype)


def attach_adapters(lm: nn.Module, adapters: list[LoRAAdapter], batch_size: int,
                    strategy: str = "auto") -> AdapterSet:
    """Wrap every linear of ``lm`` so that each slot can use its own adapter (or none)."""
    names = [adapter.name for adapter in adapters]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must be unique, got {names}")
    targets = linear_targets(lm)
    for adapter in adapters:
        if set(adapter.pairs) != set(targets):
            raise AdapterError(f"adapter {adapter.name!r} does not cover this LM's linear layers")
    rank = max((adapter.rank for adapter in adapters), default=1)
    weight = next(iter(targets.values())).weight
    scales = torch.tensor([0.0] + [adapter.scaling for adapter in adapters], device=weight.device,
                          dtype=weight.dtype)
    adapter_set = AdapterSet(names, scales, rank, strategy, batch_size)
    for path, module in targets.items():
        base = unwrap(module)
        a_stack, bt_stack = _stack(adapters, path, rank, base.in_features, base.out_features,
                                   base.weight.device, base.weight.dtype)
        replace_module(lm, path, MultiLoRALinear(base, a_stack, bt_stack, adapter_set))
    lm.adapter_set = adapter_set  # how a DuplexEngine built on this LM finds them
    return adapter_set


def detach_adapters(lm: nn.Module) -> None:
    """Put the base linears back (undo ``attach_adapters`` / ``add_lora``)."""
    for path, module in linear_targets(lm).items():
        if module is not unwrap(module):
            replace_module(lm, path, unwrap(module))
    if "adapter_set" in vars(lm):
        del lm.adapter_set


def add_lora(lm: nn.Module, config: LoRAConfig) -> dict[str, LoRALinear]:
    """Wrap every linear in a trainable LoRALinear (B zero: the model is unchanged). Returns them by path."""
    wrapped = {}
    for path, module in linear_targets(lm).items():
        layer = LoRALinear(unwrap(module), config.rank, config.scaling)
        replace_module(lm, path, layer)
        wrapped[path] = layer
    return wrapped


def apply_adapter(lm: nn.Module, adapter: LoRAAdapter) -> dict[str, LoRALinear]:
    """Apply one adapter unmerged (on the side of the frozen weights)."""
    wrapped = add_lora(lm, adapter.config)
    for path, layer in wrapped.items():
        layer.set_pair(*adapter.pairs[path])
    return wrapped


def lora_pairs(lm: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (A, B) of every LoRALinear of ``lm``, by module path."""
    return {path: module.pair() for path, module in lm.named_modules() if isinstance(module, LoRALinear)}


def parse_adapter_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` (the ``--adapter`` flag) -> (name, path)."""
    name, sep, path = text.partition("=")
    name = name.strip()
    if not sep or not name or not path:
        raise AdapterError(f"--adapter expects NAME=PATH (an adapter file with its config.json beside it), got {text!r}")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise AdapterError(f"adapter name {name!r} may use letters, digits, '-', '_' and '.' only")
    return name, path


def load_adapter_set(lm: nn.Module, specs: list[str], batch_size: int = 1, strategy: str = "auto") -> AdapterSet:
    """Read every ``NAME=PATH`` adapter strictly and attach them all to ``lm`` (one batched step)."""
    from .lora import read_adapter

    adapters = []
    for spec in specs:
        name, path = parse_adapter_spec(spec)
        adapters.append(read_adapter(path, lm, name=name))
    return attach_adapters(lm, adapters, batch_size, strategy)
