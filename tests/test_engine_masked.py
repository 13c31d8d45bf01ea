"""The engine's masked, bucketed step: timing never changes a conversation, idle slots cost nothing and keep
their state, slots move, and the device step never waits for the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from masking_util import assert_rows_unchanged, snapshot
from server_harness import load_tiny_models

from duplex.server.engine import FRAME_SIZE, DuplexEngine, SlotEngine, SlotSampling, bucket_sizes

GREEDY = {"use_sampling": False}
SEEDED = SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0, top_k=20, top_k_text=10, seed=77)


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


def audio_for(slots: int, frames: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((slots, frames * FRAME_SIZE)) * 0.2).astype(np.float32)


def run_pattern(engine: DuplexEngine, audio: np.ndarray, pattern: np.ndarray, requests) -> list:
    """Join every slot at step 0, then step with ready = pattern[t]; each slot reads its next frame when
    ready. Returns per slot its (tokens [9, n], pcm) of the steps with output."""
    slots = audio.shape[0]
    for slot in range(slots):
        engine.join(slot, requests[slot])
    cursor = np.zeros(slots, dtype=int)
    tokens: list[list[np.ndarray]] = [[] for _ in range(slots)]
    pcm: list[list[np.ndarray]] = [[] for _ in range(slots)]
    garbage = np.random.default_rng(99)
    for ready in pattern:
        frames = garbage.standard_normal((engine.batch_size, FRAME_SIZE)).astype(np.float32)  # ignored rows
        ready_all = np.zeros(engine.batch_size, dtype=bool)
        ready_all[:slots] = ready
        for slot in np.flatnonzero(ready):
            frames[slot] = audio[slot, cursor[slot] * FRAME_SIZE:(cursor[slot] + 1) * FRAME_SIZE]
            cursor[slot] += 1
        out = engine.step(frames, ready_all)
        assert not out.has_output[~ready_all].any()
        np.testing.assert_array_equal(out.tokens[:, 0] >= 0, out.has_output)
        for slot in np.flatnonzero(out.has_output[:slots]):
            tokens[slot].append(out.tokens[slot].copy())
            pcm[slot].append(out.pcm[slot].copy())
    return [(np.stack(t, axis=1), np.concatenate(p)) for t, p in zip(tokens, pcm)]


def timed_pattern(frames: int, slots: int, seed: int) -> np.ndarray:
    """Ready patterns delivering exactly ``frames`` frames per slot: jitter, bursts, a long pause, even."""
    rng = np.random.default_rng(seed)
    columns = []
    for slot in range(slots):
        kind = (slot + seed) % 4
        if kind == 0:
            ready = np.ones(frames, dtype=bool)
        elif kind == 1:
            ready = rng.random(3 * frames) < 0.5
        elif kind == 2:
            ready = np.tile([False, False, True, True, True, False, False], frames)  # starts late
        else:
            ready = np.concatenate([np.ones(4, bool), np.zeros(9, bool), np.ones(3 * frames, bool)])
        ready[np.flatnonzero(ready)[frames:]] = False
        columns.append(ready)
    steps = max(len(c) for c in columns) + 1
    pattern = np.zeros((steps, slots), dtype=bool)
    for slot, column in enumerate(columns):
        pattern[:len(column), slot] = column
        assert column.sum() == frames
    return pattern


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_any_timing_gives_the_same_conversation(models, sampled):
    slots, frames = 4, 10
    audio = audio_for(slots, frames)
    requests = [SEEDED if sampled and slot % 2 == 0 else SlotSampling(use_sampling=False, seed=slot)
                for slot in range(slots)]
    even = run_pattern(DuplexEngine(models.mimi, models.lm, slots, GREEDY), audio,
                       np.ones((frames, slots), dtype=bool), requests)
    for seed in (0, 1):
        engine = DuplexEngine(models.mimi, models.lm, slots, GREEDY)
        gapped = run_pattern(engine, audio, timed_pattern(frames, slots, seed), requests)
        for slot in range(slots):
            assert gapped[slot][0].shape == (9, frames - 1)
            np.testing.assert_array_equal(gapped[slot][0], even[slot][0])
            np.testing.assert_array_equal(gapped[slot][1], even[slot][1])  # bit-identical audio


def test_a_slot_not_ready_keeps_every_state_tensor(models):
    engine = DuplexEngine(models.mimi, models.lm, 5, GREEDY)
    audio = audio_for(5, 8)
    for slot in range(5):
        engine.join(slot, SEEDED if slot == 1 else None)
    ready = np.ones(5, dtype=bool)
    for t in range(8):
        if t >= 3:  # slots 1 and 3 pause mid-conversation, slot 4 after its first frame
            ready = np.array([True, t % 2 == 0, True, False, t < 1])
        before = (snapshot(engine.mimi_state), snapshot(engine.lm_state))
        engine.step(audio[:, t * FRAME_SIZE:(t + 1) * FRAME_SIZE], ready)
        idle = np.flatnonzero(~ready).tolist()
        assert_rows_unchanged(before[0], engine.mimi_state, idle, 5)
        assert_rows_unchanged(before[1], engine.lm_state, idle, 5)


def test_buckets_cover_the_highest_occupied_slot(models):
    assert bucket_sizes(16) == (4, 8, 16)  # never fewer than BATCH_INVARIANT_ROWS
    assert bucket_sizes(2) == (4,)  # a 2-slot engine computes 2 padding rows
    assert bucket_sizes(16, min_rows=1) == (1, 2, 4, 8, 16)
    assert bucket_sizes(6, min_rows=1) == (1, 2, 4, 6)
    assert bucket_sizes(8, [3], min_rows=1) == (3, 8)
    with pytest.raises(ValueError, match="buckets must lie in 1..4"):
        bucket_sizes(4, [0, 2])
    engine = DuplexEngine(models.mimi, models.lm, 8, GREEDY, min_rows=1)
    none = np.zeros(8, dtype=bool)
    assert engine.rows_for(none) == 0
    assert engine.step(np.zeros((8, FRAME_SIZE), np.float32), none).rows == 0
    first = np.eye(8, dtype=bool)[0]
    engine.join(0)
    assert engine.rows_for(none) == 0  # occupied but nothing ready: nothing to compute
    assert engine.rows_for(first) == 1
    engine.join(4)
    assert engine.rows_for(first) == 8
    engine.leave(4)
    engine.join(2)
    assert engine.rows_for(first) == 4
    assert engine.step(np.zeros((8, FRAME_SIZE), np.float32), np.eye(8, dtype=bool)[0]).rows == 4
    assert engine.step(np.zeros((8, FRAME_SIZE), np.float32)).rows == 8  # ready=None: every slot


def test_one_conversation_on_a_big_engine_equals_a_one_slot_engine(models):
    audio = audio_for(1, 8, seed=3)
    pattern = np.ones((8, 1), dtype=bool)
    solo = run_pattern(DuplexEngine(models.mimi, models.lm, 1, GREEDY), audio, pattern, [SEEDED])
    big = DuplexEngine(models.mimi, models.lm, 16, GREEDY, min_rows=1)  # no floor: one row, as the 1-slot engine
    alone = run_pattern(big, audio, pattern, [SEEDED])
    np.testing.assert_array_equal(alone[0][0], solo[0][0])
    np.testing.assert_array_equal(alone[0][1], solo[0][1])  # the same one-row computation


def test_a_moved_conversation_continues_bit_identically(models):
    """Slot 1 leaves, the conversation in slot 2 moves to slot 1; equal to it living in slot 1 from the start
    (both runs step 4 rows throughout: the bucket floor)."""
    audio = audio_for(3, 12, seed=4)
    frames = lambda t, order: np.stack([audio[i, t * FRAME_SIZE:(t + 1) * FRAME_SIZE] for i in order] +
                                       [np.zeros(FRAME_SIZE, np.float32)])

    def run(order, move: bool):
        engine = DuplexEngine(models.mimi, models.lm, 4, GREEDY)
        engine.join(0)
        engine.join(1, SEEDED if order[1] == 2 else None)
        engine.join(2, SEEDED if order[2] == 2 else None)
        outputs = []
        for t in range(12):
            if t == 5:
                engine.leave(1 if move else 2)  # the neighbour (conversation 1) hangs up
                if move:
                    engine.move_slot(2, 1)
            rows_now = [order[0], order[2], order[1]] if move and t >= 5 else order  # who sits where
            out = engine.step(frames(t, rows_now), np.array([True, True, t < 5, False]))
            slot = (1 if t >= 5 else 2) if move else 1
            if out.has_output[slot]:
                outputs.append((out.tokens[slot].copy(), out.pcm[slot].copy(), out.rows))
        return outputs

    moved = run(order=[0, 1, 2], move=True)  # conversation 2 starts in slot 2
    fixed = run(order=[0, 2, 1], move=False)  # conversation 2 lives in slot 1 all along
    assert {rows for *_, rows in moved} == {rows for *_, rows in fixed} == {4}
    for (tokens_a, pcm_a, _), (tokens_b, pcm_b, _) in zip(moved, fixed, strict=True):
        np.testing.assert_array_equal(tokens_a, tokens_b)
        np.testing.assert_array_equal(pcm_a, pcm_b)


def test_move_before_the_first_frame_keeps_the_settings(models):
    audio = audio_for(1, 6, seed=5)
    pattern = np.ones((6, 1), dtype=bool)
    request = SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0)  # seed None: the joining slot's index
    engine = DuplexEngine(models.mimi, models.lm, 2, GREEDY)
    engine.join(1, request)
    engine.move_slot(1, 0)
    assert engine.rows_for(np.array([True, False])) == engine.rows_for(np.array([False, True])) == 4  # the floor
    outputs = []
    for t in range(6):
        out = engine.step(np.stack([audio[0, t * FRAME_SIZE:(t + 1) * FRAME_SIZE], np.zeros(FRAME_SIZE)]),
                          np.array([True, False]))
        if out.has_output[0]:
            outputs.append(out.tokens[0].copy())
    reference = DuplexEngine(models.mimi, models.lm, 2, GREEDY)
    reference.join(0, SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0, seed=1))
    reference.join(1)
    expected = run_pattern(reference, np.stack([audio[0], audio[0]]), np.ones((6, 2), dtype=bool),
                           [SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0, seed=1), None])[0][0]
    np.testing.assert_array_equal(np.stack(outputs, axis=1), expected)


def test_requests_are_validated_at_join_and_ready_masks_checked(models):
    engine = DuplexEngine(models.mimi, models.lm, 2, GREEDY)
    slot_engine: SlotEngine = engine  # the scheduler's view of it
    assert (slot_engine.batch_size, slot_engine.frame_size) == (2, models.mimi.frame_size)
    with pytest.raises(ValueError, match="temp must be >= 0"):
        engine.join(0, SlotSampling(temp=-1.0))

    class Request:  # any object with the attribute names will do; extra ones are ignored
        use_sampling, temp, note = False, None, "anything"  # (adapter: see tests/test_lora_engine.py)

    engine.join(0, Request())
    with pytest.raises(ValueError, match=r"ready must be a bool array of shape \[2\]"):
        engine.step(np.zeros((2, FRAME_SIZE), np.float32), np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="NaN or infinite"):
        engine.step(np.full((2, FRAME_SIZE), np.nan, np.float32))
    frames = np.zeros((2, FRAME_SIZE), np.float32)
    frames[1] = np.nan  # a slot that is not ready may hold anything
    assert engine.step(frames, np.array([True, False])).rows == 4  # one slot, padded to the floor
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        DuplexEngine(models.mimi, models.lm, 2, GREEDY, cuda_graphs=True)
