"""The shared streaming transformer: streaming == offline, causality, slot independence, keys."""

from __future__ import annotations

import itertools

import pytest
import torch

from duplex.model.transformer import StreamingTransformer, TransformerConfig

torch.manual_seed(0)


def make(**overrides) -> StreamingTransformer:
    options = dict(d_model=32, num_heads=4, num_layers=2, dim_feedforward=48, context=6)
    options.update(overrides)
    model = StreamingTransformer(TransformerConfig(**options)).eval()
    with torch.no_grad():
        for param in model.parameters():  # non-trivial norms and scales
            param.add_(0.1 * torch.randn_like(param))
    return model


def stream(model: StreamingTransformer, x: torch.Tensor, chunks: list[int], max_steps: int | None = None):
    """Feed x [B, T, D] in chunks of the given sizes (cycled) through one state."""
    state = model.init_state(x.shape[0], chunk_size=max(chunks), max_steps=max_steps or x.shape[1])
    outputs, start = [], 0
    for size in itertools.cycle(chunks):
        if start >= x.shape[1]:
            break
        outputs.append(model(x[:, start:start + size], state))
        start += size
    return torch.cat(outputs, dim=1)


OPTIONS = [
    dict(),
    dict(norm="rms_norm_f32", gating="silu", layer_scale=None),
    dict(norm="rms_norm", gating="gelu", positional_embedding="sin", layer_scale=0.1),
    dict(positional_embedding="none", context=None),
    dict(context=1),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("chunks", [[1], [2], [3], [1, 4, 2], [5, 1]])
@torch.no_grad()
def test_streaming_equals_offline_past_the_context(options, chunks):
    model = make(**options)
    x = torch.randn(3, 23, 32)  # 23 steps: well past context 6
    torch.testing.assert_close(stream(model, x, chunks), model(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_sliding_window_limits_what_a_step_sees():
    model = make(context=4)
    x = torch.randn(1, 12, 32)
    y = model(x)
    changed = x.clone()
    changed[:, :3] = torch.randn(1, 3, 32)  # older than the window of the last steps
    # A layer's output at step t depends on steps > t - 4; two layers widen that to t - 6.
    torch.testing.assert_close(model(changed)[:, 9:], y[:, 9:])
    assert not torch.allclose(model(changed)[:, 3:5], y[:, 3:5])


@torch.no_grad()
def test_future_never_changes_the_past():
    model = make()
    x = torch.randn(2, 15, 32)
    changed = x.clone()
    changed[:, 9:] = torch.randn(2, 6, 32)
    torch.testing.assert_close(model(changed)[:, :9], model(x)[:, :9])


@torch.no_grad()
def test_slot_reset_restarts_one_slot_only():
    model = make()
    first, second = torch.randn(3, 10, 32), torch.randn(3, 14, 32)
    state = model.init_state(3)
    for t in range(10):
        model(first[:, t:t + 1], state)
    state.reset(torch.tensor([False, True, False]))
    inputs = first.clone()
    outputs = []
    for t in range(14):
        step = torch.where(torch.tensor([False, True, False])[:, None, None], second[:, t:t + 1],
                           torch.randn(3, 1, 32))
        inputs = torch.cat([inputs, step], dim=1)
        outputs.append(model(step, state))
    outputs = torch.cat(outputs, dim=1)
    torch.testing.assert_close(outputs[1:2], model(second[1:2]), atol=1e-5, rtol=1e-5)
    for slot in (0, 2):  # the neighbours went on as if nothing happened
        torch.testing.assert_close(outputs[slot:slot + 1], model(inputs[slot:slot + 1])[:, 10:],
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_reset_clears_a_poisoned_cache():
    model = make()
    x = torch.randn(2, 5, 32)
    state = model.init_state(2)
    for t in range(5):
        model(x[:, t:t + 1], state)
    for keys, values in zip(state.keys, state.values):  # e.g. an overflow in the previous conversation
        keys[0].fill_(float("nan"))
        values[0].fill_(float("nan"))
    state.reset(torch.tensor([True, False]))
    out = torch.cat([model(x[:, t:t + 1], state) for t in range(5)], dim=1)
    torch.testing.assert_close(out[:1], model(x[:1]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_batch_slots_are_independent():
    model = make()
    x = torch.randn(4, 9, 32)
    together = model(x)
    for slot in range(4):
        torch.testing.assert_close(together[slot:slot + 1], model(x[slot:slot + 1]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_per_step_weights_follow_the_schedule():
    model = make(gating="silu", weights_per_step=3, weights_per_step_schedule=(0, 1, 1), context=None)
    assert len(model.layers[0].self_attn.in_projs) == 2
    assert len(model.layers[0].gating) == 2
    x = torch.randn(2, 3, 32)
    offline = model(x)
    state = model.init_state(2, max_steps=3)
    steps = [model(x[:, t:t + 1], state) for t in range(3)]
    torch.testing.assert_close(torch.cat(steps, 1), offline, atol=1e-5, rtol=1e-5)
    state.reset_all()  # a new frame starts again from the first weight set
    torch.testing.assert_close(model(x[:, :1], state), offline[:, :1], atol=1e-5, rtol=1e-5)


def test_key_names_follow_kyutai_layout():
    keys = set(make(norm="rms_norm_f32", gating="silu", layer_scale=0.1).state_dict())
    assert "layers.0.self_attn.in_projs.0.weight" in keys
    assert "layers.1.self_attn.out_projs.0.weight" in keys
    assert "layers.0.norm1.alpha" in keys and "layers.0.gating.linear_in.weight" in keys
    assert "layers.0.layer_scale_2.scale" in keys
    keys = set(make().state_dict())
    assert {"layers.0.norm2.bias", "layers.0.linear1.weight", "layers.0.linear2.weight"} <= keys


def test_bad_configs_and_inputs_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_model=30, num_heads=4, num_layers=1, dim_feedforward=8)
    with pytest.raises(ValueError, match="norm"):
        TransformerConfig(d_model=32, num_heads=4, num_layers=1, dim_feedforward=8, norm="batch_norm")
    model = make(context=None)
    with pytest.raises(ValueError, match="max_steps"):
        model.init_state(2)
    state = model.init_state(2, chunk_size=2, max_steps=4)
    with pytest.raises(ValueError, match="chunk_size"):
        model(torch.randn(2, 3, 32), state)
    with pytest.raises(ValueError, match="reset mask"):
        state.reset(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(3, 1, 32), state)


@pytest.mark.parametrize("chunks", [[1], [3], [2, 1]])
@torch.no_grad()
def test_unlimited_context_streams_as_a_window_of_max_steps(chunks):
    unlimited = make(context=None)
    windowed = make(context=5)
    windowed.load_state_dict(unlimited.state_dict())
    x = torch.randn(2, 17, 32)
    streamed = stream(unlimited, x, chunks, max_steps=5)
    torch.testing.assert_close(streamed, windowed(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(streamed[:, :5], unlimited(x[:, :5]), atol=1e-5, rtol=1e-5)
