"""A conversation's numbers do not depend on its neighbours: bit-identical output in any bucket.

The engine never computes fewer than BATCH_INVARIANT_ROWS rows. From that floor on, each row of a matmul or a
convolution gets the same bits whatever the batch on this CPU (below it other kernels, another summation
order, run). So a conversation alone on a 16-slot server, every frame on time, and the same conversation there
with neighbours joining, leaving and moving it, at any timing, give the same tokens and the same audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lm_test_utils import random_user_codes
from server_harness import load_tiny_models

from duplex.model.generate import LMGen
from duplex.model.lm import LMModel
from duplex.server.engine import BATCH_INVARIANT_ROWS, FRAME_SIZE, DuplexEngine, SlotSampling

GREEDY = SlotSampling(use_sampling=False)
SEEDED = SlotSampling(use_sampling=True, temp=1.0, temp_text=1.0, top_k=20, top_k_text=10, seed=5)
STEPS = 24


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


@pytest.mark.parametrize("dims", [(32, 64), (64, 264), (512, 2048), (1024, 4096)])
def test_matmul_rows_are_batch_invariant_from_the_floor_on(dims):
    """The platform property the floor rests on (a failure here names the kernel that broke it)."""
    d_in, d_out = dims
    torch.manual_seed(0)
    weight, x = torch.randn(d_out, d_in), torch.randn(64, d_in)  # [N, D], [M, D]
    full = F.linear(x, weight)  # [64, N]
    for rows in range(BATCH_INVARIANT_ROWS, 65):
        assert torch.equal(F.linear(x[:rows], weight), full[:rows]), f"linear {dims}: {rows} rows != 64 rows"


@pytest.mark.parametrize("shape", [(1, 4, 7, 1, 1926), (16, 32, 8, 4, 40), (32, 32, 3, 1, 10), (32, 32, 2, 2, 2)])
def test_convolution_rows_are_batch_invariant_from_the_floor_on(shape):
    c_in, c_out, kernel, stride, length = shape
    torch.manual_seed(0)
    x = torch.randn(16, c_in, length)  # [B, C, T]
    weight, transposed = torch.randn(c_out, c_in, kernel), torch.randn(c_in, c_out, kernel)
    full = F.conv1d(x, weight, stride=stride)
    full_t = F.conv_transpose1d(x, transposed, stride=stride)
    for batch in range(BATCH_INVARIANT_ROWS, 17):
        assert torch.equal(F.conv1d(x[:batch], weight, stride=stride), full[:batch]), f"conv1d {shape}, {batch}"
        assert torch.equal(F.conv_transpose1d(x[:batch], transposed, stride=stride), full_t[:batch]), shape


def frames_of(audio: np.ndarray, index: int) -> np.ndarray:
    return audio[index * FRAME_SIZE:(index + 1) * FRAME_SIZE]


def solo_run(models, audio: np.ndarray, request, slots: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """The conversation alone in slot 0 of an engine, every frame on time: (tokens [9], pcm [1920]) per output."""
    engine = DuplexEngine(models.mimi, models.lm, slots, models.lm_gen_defaults)
    engine.join(0, request)
    outputs = []
    for t in range(STEPS):
        pcm = np.zeros((slots, FRAME_SIZE), np.float32)
        pcm[0] = frames_of(audio, t)
        out = engine.step(pcm, np.arange(slots) == 0)
        if out.has_output[0]:
            outputs.append((out.tokens[0].copy(), out.pcm[0].copy()))
    return outputs


def crowded_run(models, audio: np.ndarray, request, seed: int) -> tuple[list, set[int]]:
    """The same conversation on a 16-slot engine: it starts in slot 2 next to two neighbours, nine more join
    (bucket 16), then all but slot 0 leave and it is moved to slot 1 (bucket 4); its frames come in bursts and
    pauses, the neighbours' at random. Returns its outputs and the buckets stepped."""
    rng = np.random.default_rng(seed)
    engine = DuplexEngine(models.mimi, models.lm, 16, models.lm_gen_defaults)
    for slot in (0, 1):
        engine.join(slot, SEEDED)
    engine.join(2, request)
    slot, sent, outputs, buckets, t = 2, 0, [], set(), 0
    while sent < STEPS:
        if t == 8:
            for neighbour in range(3, 12):
                engine.join(neighbour, SEEDED)
        if t == 20:
            for neighbour in range(1, 12):
                if neighbour != slot:
                    engine.leave(neighbour)
            engine.move_slot(slot, 1)
            slot = 1
        ready = rng.random(16) < 0.7  # neighbours: random gaps
        ready &= engine._occupied[:16]
        ready[slot] = (t % 7) not in (2, 3, 4)  # the conversation: pauses, then a burst of catch-up steps
        pcm = rng.standard_normal((16, FRAME_SIZE)).astype(np.float32) * 0.2
        if ready[slot]:
            pcm[slot] = frames_of(audio, sent)
            sent += 1
        out = engine.step(pcm, ready)
        buckets.add(out.rows)
        if out.has_output[slot]:
            outputs.append((out.tokens[slot].copy(), out.pcm[slot].copy()))
        t += 1
    return outputs, buckets


@pytest.mark.parametrize("request_", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_one_conversation_is_bit_identical_in_any_bucket_next_to_any_neighbours(models, request_):
    audio = (np.random.default_rng(11).standard_normal(STEPS * FRAME_SIZE) * 0.2).astype(np.float32)
    expected = solo_run(models, audio, request_)
    got, buckets = crowded_run(models, audio, request_, seed=3)
    assert {4, 16} <= buckets, buckets  # it really was stepped in different buckets
    assert len(expected) == STEPS - models.lm.config.max_delay
    assert_same_outputs(got, expected)
    assert_same_outputs(solo_run(models, audio, request_, slots=2), expected)  # 2 slots + 2 padding rows


def assert_same_outputs(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for step, ((tokens, pcm), (tokens_solo, pcm_solo)) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(tokens, tokens_solo, err_msg=f"tokens of output {step}")
        np.testing.assert_array_equal(pcm, pcm_solo, err_msg=f"audio of output {step}")


def _hidden_rows(lm: LMModel, batch: int, user_codes: torch.Tensor) -> list[torch.Tensor]:
    """Step LMGen at ``batch`` rows (rows beyond the codes' batch get zeros) and record the temporal and depth
    transformers' outputs of the first rows."""
    rows = user_codes.shape[0]
    recorded: list[torch.Tensor] = []
    hooks = [module.register_forward_hook(lambda _m, _i, out: recorded.append(out[:rows].clone()))
             for module in (lm.out_norm, lm.depformer)]
    try:
        gen = LMGen(lm, use_sampling=False)
        state = gen.init_state(batch)
        padded = torch.zeros(batch, *user_codes.shape[1:], dtype=user_codes.dtype)  # [batch, Ku, T]
        padded[:rows] = user_codes
        with torch.inference_mode():
            for t in range(user_codes.shape[-1]):
                gen.step(padded[:, :, t:t + 1], state)
    finally:
        for hook in hooks:
            hook.remove()
    return recorded


@pytest.mark.parametrize("weights", ["q8", "int8", "int4"])
def test_quantized_lm_rows_are_batch_invariant(fixtures_dir, weights):
    if weights == "q8":
        lm = LMModel.from_pretrained(fixtures_dir / "lm_tiny_q8" / "model.q8.safetensors", dtype=torch.float32)
    else:
        lm = LMModel.from_pretrained(fixtures_dir / "lm_tiny" / "model.safetensors", dtype=torch.float32,
                                     quantize=weights)
    codes = random_user_codes(lm, BATCH_INVARIANT_ROWS, 6)  # [4, Ku, 6]
    small, large = _hidden_rows(lm, BATCH_INVARIANT_ROWS, codes), _hidden_rows(lm, 16, codes)
    assert len(small) == len(large) > 0
    for index, (a, b) in enumerate(zip(small, large)):
        assert torch.equal(a, b), f"{weights}: output {index} differs between 4 and 16 rows"
