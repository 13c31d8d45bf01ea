"""CUDA only (skipped elsewhere): CUDA-graph engine steps equal eager ones, and the eager device step never
syncs with the host. Run on a GPU machine: ``pytest tests/test_engine_cuda.py``."""

from __future__ import annotations

import pytest
import torch

from duplex.server.bench_engine import check_cuda_graphs, load_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_graph_steps_equal_eager_steps(fixtures_dir):
    mimi, lm = load_models("tiny", fixtures_dir, torch.device("cuda"))
    report = check_cuda_graphs(mimi, lm, torch.device("cuda"))
    assert report["sync_error"] is None, report["text"]
    assert report["token_mismatches"] == 0, report["text"]
    assert report["max_pcm"] < 1e-3, report["text"]


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_a_conversation_is_bit_identical_in_any_bucket_on_cuda(fixtures_dir, tiny_tokenizer_path, sampling):
    """tests/test_engine_invariance.py's crowded-vs-solo check with the engine on the GPU (see docs/engine.md:
    where it fails, buckets=[batch_size] is the exact configuration)."""
    import numpy as np
    from server_harness import load_tiny_models
    from test_engine_invariance import FRAME_SIZE, GREEDY, SEEDED, STEPS, crowded_run, solo_run

    models = load_tiny_models(fixtures_dir, tiny_tokenizer_path)
    models.mimi.to("cuda")
    models.lm.to("cuda")
    request = GREEDY if sampling == "greedy" else SEEDED
    audio = (np.random.default_rng(11).standard_normal(STEPS * FRAME_SIZE) * 0.2).astype(np.float32)
    expected = solo_run(models, audio, request)
    got, buckets = crowded_run(models, audio, request, seed=3)
    assert {4, 16} <= buckets, buckets
    for (tokens, pcm), (tokens_solo, pcm_solo) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(tokens, tokens_solo)
        np.testing.assert_array_equal(pcm, pcm_solo)
