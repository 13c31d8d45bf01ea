"""Several adapters in one batch: each slot gets its own delta, equal to its solo run; nothing leaks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from server_harness import load_tiny_models

from duplex.model.lora import merge_adapter, read_adapter
from duplex.model.lora_multi import UnknownAdapterError, attach_adapters, detach_adapters, load_adapter_set
from duplex.server.engine import FRAME_SIZE, DuplexEngine, SlotSampling

GREEDY = SlotSampling(use_sampling=False)
STEPS = 14


@pytest.fixture(scope="module")
def second_adapter(fixtures_dir, tmp_path_factory):
    """Another adapter for lm_tiny with a different rank (2) and scaling: random, but strong."""
    folder = tmp_path_factory.mktemp("second")
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for key, value in load_file(str(fixtures_dir / "lm_tiny_lora" / "lora.safetensors")).items():
        shape = (2, value.shape[1]) if key.endswith("lora_A.weight") else (value.shape[0], 2)
        tensors[key] = torch.randn(shape, generator=generator) * 0.3
    save_file(tensors, str(folder / "lora.safetensors"))
    config = json.loads((fixtures_dir / "lm_tiny_lora" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "lora_rank": 2, "lora_scaling": 1.5}))
    return folder / "lora.safetensors"


def user_audio(seed: int, frames: int = STEPS) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(frames * FRAME_SIZE) * 0.3).astype(np.float32)


def run_engine(engine: DuplexEngine, plan: dict[int, list[tuple[int, str | None, np.ndarray]]], steps: int):
    """plan: slot -> [(start step, adapter, audio)]: each conversation's output tokens [T, 9]."""
    results = {}
    for step in range(steps):
        frames = np.zeros((engine.batch_size, FRAME_SIZE), dtype=np.float32)
        for slot, conversations in plan.items():
            for number, (start, adapter, audio) in enumerate(conversations):
                index = step - start
                if index == 0:
                    engine.join(slot, GREEDY, adapter=adapter)
                if 0 <= index < audio.size // FRAME_SIZE:
                    frames[slot] = audio[index * FRAME_SIZE:(index + 1) * FRAME_SIZE]
        out = engine.step(frames)
        for slot, conversations in plan.items():
            for number, (start, _, audio) in enumerate(conversations):
                if 0 <= step - start < audio.size // FRAME_SIZE and out.has_output[slot]:
                    results.setdefault((slot, number), []).append(out.tokens[slot].copy())
    return {key: np.stack(value) for key, value in results.items()}


def solo(models, adapter_path, audio) -> np.ndarray:
    """One conversation alone, with the adapter merged into the weights (or the base model)."""
    lm = models.lm
    saved = {name: p.detach().clone() for name, p in lm.named_parameters()}
    if adapter_path is not None:
        merge_adapter(lm, read_adapter(adapter_path, lm))
    try:
        engine = DuplexEngine(models.mimi, lm, batch_size=1)
        return run_engine(engine, {0: [(0, None, audio)]}, audio.size // FRAME_SIZE)[(0, 0)]
    finally:
        with torch.no_grad():
            for name, p in lm.named_parameters():
                p.copy_(saved[name])


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


@pytest.mark.parametrize("strategy", ["gather", "concat"])
def test_each_slot_equals_its_solo_run(models, fixtures_dir, second_adapter, strategy):
    first = fixtures_dir / "lm_tiny_lora" / "lora.safetensors"
    audio = {slot: user_audio(slot) for slot in range(4)}
    expected = {0: solo(models, None, audio[0]), 1: solo(models, first, audio[1]),
                2: solo(models, second_adapter, audio[2]), 3: solo(models, first, audio[3])}
    assert not np.array_equal(expected[1], solo(models, None, audio[1]))  # the adapter matters
    load_adapter_set(models.lm, [f"tiny={first}", f"other={second_adapter}"], strategy=strategy)
    try:
        engine = DuplexEngine(models.mimi, models.lm, batch_size=4)
        assert engine.adapters.names == ["tiny", "other"]
        plan = {0: [(0, None, audio[0])], 1: [(0, "tiny", audio[1])], 2: [(2, "other", audio[2])],
                3: [(1, "tiny", audio[3])]}
        got = run_engine(engine, plan, STEPS + 2)
    finally:
        detach_adapters(models.lm)
    for slot in range(4):
        np.testing.assert_array_equal(got[(slot, 0)], expected[slot], err_msg=f"slot {slot}")


def test_adapter_never_leaks_to_the_next_occupant(models, fixtures_dir):
    first = fixtures_dir / "lm_tiny_lora" / "lora.safetensors"
    short, after = user_audio(10, 6), user_audio(11, 8)
    expected_adapter, expected_base = solo(models, first, short), solo(models, None, after)
    adapter = read_adapter(first, models.lm, name="tiny")
    attach_adapters(models.lm, [adapter], batch_size=2)
    try:
        engine = DuplexEngine(models.mimi, models.lm, batch_size=2)
        plan = {0: [(0, "tiny", short), (6, None, after)], 1: [(0, None, user_audio(12, 14))]}
        got = run_engine(engine, plan, 14)
        with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'.*tiny"):
            engine.join(1, GREEDY, adapter="nope")
    finally:
        detach_adapters(models.lm)
    np.testing.assert_array_equal(got[(0, 0)], expected_adapter)
    np.testing.assert_array_equal(got[(0, 1)], expected_base)
    plain = DuplexEngine(models.mimi, models.lm, batch_size=1)
    with pytest.raises(UnknownAdapterError, match="has none"):
        plain.join(0, GREEDY, adapter="tiny")


@pytest.mark.parametrize("strategy", ["gather", "concat"])
def test_a_step_over_some_slots_maps_rows_to_those_slots(models, fixtures_dir, second_adapter, strategy):
    """use_rows(slots): a step that runs only some slots (row i = slot slots[i]) gets their adapters."""
    first = fixtures_dir / "lm_tiny_lora" / "lora.safetensors"
    adapters = load_adapter_set(models.lm, [f"tiny={first}", f"other={second_adapter}"], batch_size=3,
                                strategy=strategy)
    try:
        for slot, index in enumerate((2, 0, 1)):
            adapters.selection.set_slot(slot, index)
        layer = models.lm.text_linear
        x = torch.randn(3, 1, layer.in_features)
        with torch.no_grad():
            full = layer(x)  # [3, 1, out]: all slots
            adapters.selection.use_rows(torch.tensor([2, 0]))
            part = layer(x[[2, 0]])
            adapters.selection.use_rows(None)
        torch.testing.assert_close(part, full[[2, 0]])
        assert not torch.allclose(full[0], layer.base(x[0]))  # slot 0 has an adapter
        torch.testing.assert_close(full[1], layer.base(x[1]))  # slot 1 has none
    finally:
        detach_adapters(models.lm)


def test_two_engines_on_one_lm_keep_their_own_slots(models, fixtures_dir):
    """Engines of different batch sizes sharing the LM, stepped in turn: each sees only its own choices."""
    first = fixtures_dir / "lm_tiny_lora" / "lora.safetensors"
    audio = user_audio(20, 8)
    expected_adapter, expected_base = solo(models, first, audio), solo(models, None, audio)
    load_adapter_set(models.lm, [f"tiny={first}"])
    try:
        one = DuplexEngine(models.mimi, models.lm, batch_size=1)
        two = DuplexEngine(models.mimi, models.lm, batch_size=2)
        one.join(0, GREEDY, adapter="tiny")
        two.join(0, GREEDY)
        two.join(1, GREEDY)
        got_one, got_two = [], []
        for t in range(audio.size // FRAME_SIZE):
            frame = audio[t * FRAME_SIZE:(t + 1) * FRAME_SIZE]
            out_one, out_two = one.step(frame[None]), two.step(np.stack([frame, frame]))
            if out_one.has_output[0]:
                got_one.append(out_one.tokens[0].copy())
                got_two.append(out_two.tokens.copy())
    finally:
        detach_adapters(models.lm)
    np.testing.assert_array_equal(np.stack(got_one), expected_adapter)
    for slot in range(2):
        np.testing.assert_array_equal(np.stack(got_two)[:, slot], expected_base)


def test_a_moved_conversation_keeps_its_adapter(models, fixtures_dir):
    """The engine moves a conversation to a lower slot (its neighbour left): its adapter moves with it."""
    first = fixtures_dir / "lm_tiny_lora" / "lora.safetensors"
    audio = user_audio(30, 10)
    expected = solo(models, first, audio)
    load_adapter_set(models.lm, [f"tiny={first}"])
    try:
        engine = DuplexEngine(models.mimi, models.lm, batch_size=4)
        engine.join(0, GREEDY)
        engine.join(1, GREEDY)
        engine.join(2, GREEDY, adapter="tiny")
        got, slot = [], 2
        for t in range(audio.size // FRAME_SIZE):
            if t == 5:
                engine.leave(1)
                engine.move_slot(2, 1)
                slot = 1
            frames = np.zeros((4, FRAME_SIZE), dtype=np.float32)
            frames[slot] = audio[t * FRAME_SIZE:(t + 1) * FRAME_SIZE]
            out = engine.step(frames, np.array([True, True, slot == 2, False]))
            if out.has_output[slot]:
                got.append(out.tokens[slot].copy())
    finally:
        detach_adapters(models.lm)
    np.testing.assert_array_equal(np.stack(got), expected)
