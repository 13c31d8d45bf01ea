"""Helpers for the masked-step tests: every tensor of a state object, ready patterns, the ready-only reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


def all_tensors(obj, name: str = "state", seen: set | None = None) -> dict[str, torch.Tensor]:
    """Every tensor reachable from a state object (attributes, dataclass fields, lists, dicts), by path."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return {}
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {name: obj}
    if isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif isinstance(obj, dict):
        items = obj.items()
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return {}
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(all_tensors(value, f"{name}.{key}", seen))
    return found


def snapshot(state) -> dict[str, torch.Tensor]:
    return {key: tensor.clone() for key, tensor in all_tensors(state).items()}


def assert_rows_unchanged(before: dict[str, torch.Tensor], state, rows, batch: int) -> None:
    """The given slots' rows of every batch-first tensor, and every other tensor whole, are bit-identical."""
    after = all_tensors(state)
    # Sampling draw plans are a cache derived from the settings, built at first use.
    cached = {key for key in set(after) ^ set(before) if ".plan." in key}
    assert set(after) ^ set(before) <= cached, "the state gained or lost tensors"
    before = {key: value for key, value in before.items() if key not in cached}
    for key, old in before.items():
        new = after[key]
        if old.dim() > 0 and old.shape[0] == batch:
            for row in rows:
                assert torch.equal(old[row], new[row]), f"{key}[{row}] changed while its slot was not ready"
        else:
            assert torch.equal(old, new), f"{key} (not per slot) changed"


def ready_patterns(steps: int, batch: int, seed: int) -> np.ndarray:
    """[steps, B] bool: slot 0 always ready, the others jittered, in bursts or paused."""
    rng = np.random.default_rng(seed)
    pattern = rng.random((steps, batch)) < 0.6
    pattern[:, 0] = True
    if batch > 2:
        pattern[:, 2] = (np.arange(steps) // 3) % 2 == 0  # bursts of 3, pauses of 3
    return pattern


def masked_run(step, make_state, inputs: torch.Tensor, pattern: np.ndarray, check_state: bool = True):
    """Step inputs [T, B, ...] with the ready pattern [T, B]; garbage rows where not ready. Returns, per
    slot, the outputs of its ready steps, and checks that not-ready slots keep every state tensor."""
    state = make_state()
    batch = inputs.shape[1]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    garbage = torch.Generator().manual_seed(123)
    for t in range(inputs.shape[0]):
        ready = torch.from_numpy(pattern[t])
        x = inputs[t].clone()
        noise = torch.randn(x.shape, generator=garbage) if x.is_floating_point() else x.flip(0)
        x[~ready] = noise[~ready].to(x.dtype)  # what a not-ready slot's row holds must not matter
        before = snapshot(state) if check_state else None
        out = step(x, state, ready)
        if check_state:
            assert_rows_unchanged(before, state, np.flatnonzero(~pattern[t]).tolist(), batch)
        for slot in np.flatnonzero(pattern[t]):
            outputs[slot].append(out[slot].clone())
    return outputs


def ready_only_run(step, make_state, inputs: torch.Tensor, pattern: np.ndarray):
    """The reference: an unmasked run of the same batch size in which each slot gets only its ready
    steps' inputs, back to back (padded at the end with its last input)."""
    state = make_state()
    batch = inputs.shape[1]
    sequences = [inputs[np.flatnonzero(pattern[:, slot]), slot] for slot in range(batch)]
    longest = max(len(seq) for seq in sequences)
    outputs: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    for t in range(longest):
        x = torch.stack([seq[min(t, len(seq) - 1)] for seq in sequences])
        out = step(x, state, None)
        for slot, seq in enumerate(sequences):
            if t < len(seq):
                outputs[slot].append(out[slot].clone())
    return outputs


def assert_same_outputs(masked, reference) -> None:
    for slot, (got, want) in enumerate(zip(masked, reference)):
        assert len(got) == len(want)
        for index, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"slot {slot}, its ready step {index}: masked output differs"
