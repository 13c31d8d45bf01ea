"""LoRA as module swaps: the transformer keeps calling ``module(x)``.

- ``LoRALinear``: one trainable adapter around a frozen base linear (fine-tuning, or applying a
  single adapter unmerged). Keys ``<path>.lora_A.weight`` [r, in] / ``<path>.lora_B.weight``
  [out, r], exactly upstream's.
- ``MultiLoRALinear``: several adapters at once for serving; each batch row picks its own (or
  none) through an ``AdapterSelection`` that every wrapped linear of the LM shares (see
  ``duplex.model.lora_multi``; the selection in force comes from the shared ``AdapterSet``). Stacks: ``a_stack`` [N + 1, r, in], ``bt_stack`` [N + 1, r, out]
  (B transposed; index 0 is "no adapter", all zeros; smaller ranks zero-padded to r).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _WrappedLinear(nn.Module):
    """A module around a base linear that answers like it: in/out features, weight (device / dtype queries)."""

    base: nn.Module

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # the base weight
        return self.base.weight


class LoRALinear(_WrappedLinear):
    """y = base(x) + scaling * lora_B(lora_A(x)); the base stays frozen."""

    def __init__(self, base: nn.Module, rank: int, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = float(scaling)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        if base.weight.device.type == "meta":
            factory["device"] = "cpu"
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # starts as the base model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.lora_A(x.to(self.lora_A.weight.dtype))  # [..., r]
        delta = self.lora_B(low) * self.scaling  # [..., out]
        return self.base(x) + delta.to(x.dtype)

    @torch.no_grad()
    def set_pair(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Load A [r, in] and B [out, r]."""
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight


class MultiLoRALinear(_WrappedLinear):
    """base(x) plus, per batch row, the low-rank delta of that row's adapter (none: no delta)."""

    def __init__(self, base: nn.Module, a_stack: torch.Tensor, bt_stack: torch.Tensor, adapters) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("a_stack", a_stack, persistent=False)  # [N + 1, r, in]
        self.register_buffer("bt_stack", bt_stack, persistent=False)  # [N + 1, r, out]
        self.adapters = adapters  # the AdapterSet shared by every wrapped linear (its selection in force)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = self.adapters.current().route(x.shape[0])
        if route is None:  # no row uses an adapter (known on the host: no sync)
            return y
        rows = x.shape[0]
        x3 = x.reshape(rows, -1, x.shape[-1])  # [R, T, in]
        if route.gather:
            a = self.a_stack[route.adapter]  # [R, r, in]
            bt = self.bt_stack[route.adapter]  # [R, r, out]
            low = torch.bmm(x3, a.transpose(1, 2)) * route.row_scale[:, None, None]  # [R, T, r]
            delta = torch.bmm(low, bt)  # [R, T, out]
        else:
            # Every adapter's low-rank product at once, then keep only each row's own columns.
            a_all = self.a_stack[1:].flatten(0, 1)  # [N * r, in] (index 0 is all zeros)
            low = torch.matmul(x3, a_all.t()) * route.column_scale[:, None, :]  # [R, T, N * r]
            delta = torch.matmul(low, self.bt_stack[1:].flatten(0, 1))  # [R, T, out]
        return y + delta.reshape(y.shape).to(y.dtype)


LORA_WRAPPERS = (LoRALinear, MultiLoRALinear)


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Swap the submodule at ``path`` (dotted, ModuleList indices included) for ``new``."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def unwrap(module: nn.Module) -> nn.Module:
    """The base linear of a LoRA wrapper (the module itself otherwise)."""
    return module.base if isinstance(module, LORA_WRAPPERS) else module
