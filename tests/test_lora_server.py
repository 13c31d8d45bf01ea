"""Adapters through the server: /api/info lists them, adapter=NAME picks one per session (validated),
`duplex talk --adapter` equals `duplex infer --adapter` on the same audio."""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.request

import numpy as np
import pytest
from server_harness import converse, live_server, load_tiny_models, synth_audio
from test_cli_talk import opus_round_trip

from duplex.client.client import DuplexClient, ServerError
from duplex.client.infer import run_batch, sampling_from_args
from duplex.model.lora_multi import detach_adapters, load_adapter_set

FRAMES = 16


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    models = load_tiny_models(fixtures_dir, tiny_tokenizer_path)
    load_adapter_set(models.lm, [f"tiny={fixtures_dir / 'lm_tiny_lora'}"])
    yield models
    detach_adapters(models.lm)


@pytest.fixture(scope="module")
def server(models):
    with live_server(models, max_sessions=2, max_queue=0, send_tokens=True, torch_threads=1) as srv:
        yield srv


def test_info_lists_the_adapters(server):
    with urllib.request.urlopen(server.http + "/api/info", timeout=10) as response:
        assert json.loads(response.read())["adapters"] == ["tiny"]


def test_unknown_adapter_is_a_kind5_error_naming_it(server):
    async def main():
        with pytest.raises(ServerError, match=r"unknown adapter 'nope' \(query parameter adapter; this server has: tiny\)"):
            await DuplexClient.connect(server.url, params={"adapter": "nope"}, timeout=10)

    asyncio.run(main())


def offline(models, audio, adapter):
    args = argparse.Namespace(greedy=True, text_temperature=None, audio_temperature=None, text_topk=None,
                              audio_topk=None, seed=None, adapter=[f"{adapter}=x"] if adapter else None)
    return run_batch(models, [audio], sampling_from_args(args, models.lm_gen_defaults))[0]


def test_sessions_choose_their_adapter(server, models):
    audio = synth_audio(FRAMES, seed=4)
    params = {"text_temperature": 0, "audio_temperature": 0}

    async def both():  # one with the adapter, one without, in the same batch
        return await asyncio.gather(converse(server.url, audio, {**params, "adapter": "tiny"}),
                                    converse(server.url, audio, params))

    tuned, base = asyncio.run(both())
    assert not tuned.errors and not base.errors
    assert tuned.tokens != base.tokens
    metadata = [m for m in tuned.metadata if m.get("type") == "session"][0]
    assert metadata["params"]["adapter"] == "tiny"
    # `duplex infer --adapter tiny=PATH` on what the server decoded (Opus) gives the session's tokens.
    heard = opus_round_trip(audio)
    np.testing.assert_array_equal(np.array(tuned.tokens).T, offline(models, heard, "tiny").tokens)
    np.testing.assert_array_equal(np.array(base.tokens).T, offline(models, heard, None).tokens)


def test_talk_sends_the_adapter():
    from duplex.client import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.query_params(parser.parse_args(["--adapter", "tiny", "--text-seed", "3"])) == {
        "text_seed": 3, "adapter": "tiny"}
