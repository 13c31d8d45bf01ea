"""`duplex talk` against a real server on localhost with the tiny models: files in and out, the
transcript, the live (microphone) path with a fake sound device, and clean errors."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import sphn

from duplex.cli import main as duplex_main
from duplex.client.audio import FRAME_SIZE, read_audio, write_wav
from duplex.client.client import DuplexClient
from duplex.client.infer import run_batch
from server_harness import live_server, load_tiny_models, synth_audio

FRAMES = 30


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


@pytest.fixture(scope="module")
def server(models):
    with live_server(models, max_sessions=1, max_queue=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    path = tmp_path_factory.mktemp("talk") / "in.wav"
    write_wav(path, synth_audio(FRAMES, seed=3))
    return path


def opus_round_trip(pcm: np.ndarray) -> np.ndarray:
    """What the server decodes from the client's Ogg/Opus stream of ``pcm``."""
    writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
    decoded = []
    for start in range(0, pcm.size, FRAME_SIZE):
        ogg = writer.append_pcm(pcm[start : start + FRAME_SIZE])
        if ogg:
            decoded.append(np.asarray(reader.append_bytes(ogg), dtype=np.float32))
    return np.concatenate(decoded)


def wait_until_idle(server, timeout: float = 10.0) -> None:
    """Wait until the previous test's session has released its slot."""
    deadline = time.monotonic() + timeout
    while server.service.admission.active:
        assert time.monotonic() < deadline, "a session kept its slot"
        time.sleep(0.02)


def talk(url: str, *args: str) -> int:
    return duplex_main(["talk", "--url", url, "--quiet", "--drain-seconds", "0.5", *args])


def test_file_fast_gives_one_frame_per_frame_after_the_delay(server, models, speech, tmp_path, capsys):
    wait_until_idle(server)
    out, text = tmp_path / "out.wav", tmp_path / "out.txt"
    assert talk(server.url, "--input", str(speech), "--output", str(out), "--transcript", str(text), "--fast") == 0
    answer = read_audio(out)
    assert answer.size == (FRAMES - 1) * FRAME_SIZE  # the tiny LM's delay of 1 (the first frame's step)
    assert np.abs(answer).max() > 1e-3
    transcript = text.read_text().strip()
    assert transcript
    # the server is greedy here: offline inference on what the server decoded says the same
    offline = run_batch(models, [opus_round_trip(read_audio(speech))])[0]
    assert transcript == offline.transcript
    assert "received" in capsys.readouterr().err


def test_seeded_sampling_matches_offline_inference(server, models, speech, tmp_path):
    import argparse

    from duplex.client.infer import sampling_from_args

    wait_until_idle(server)
    out, text = tmp_path / "s.wav", tmp_path / "s.txt"
    flags = ["--text-temperature", "1.0", "--audio-temperature", "0.9", "--text-topk", "20"]
    assert talk(server.url, "--input", str(speech), "--output", str(out), "--transcript", str(text),
                "--fast", "--text-seed", "7", "--audio-seed", "7", *flags) == 0
    args = argparse.Namespace(greedy=False, text_temperature=1.0, audio_temperature=0.9, text_topk=20,
                              audio_topk=None, seed=7)
    sampling = sampling_from_args(args, models.lm_gen_defaults)
    assert sampling.use_sampling and sampling.text_seed == 7 == sampling.audio_seed
    offline = run_batch(models, [opus_round_trip(read_audio(speech))], sampling)[0]
    assert text.read_text().strip() == offline.transcript
    # the server's audio is the same samples through Opus (and the 16-bit WAV)
    np.testing.assert_allclose(read_audio(out), opus_round_trip(offline.pcm), atol=1e-4)


def test_file_in_real_time_matches_fast(server, speech, tmp_path):
    runs = []
    for name, extra in (("rt", []), ("fast", ["--fast"])):
        wait_until_idle(server)
        out = tmp_path / f"{name}.wav"
        started = time.monotonic()
        assert talk(server.url, "--input", str(speech), "--output", str(out), *extra) == 0
        runs.append((read_audio(out), time.monotonic() - started))
    (realtime, rt_seconds), (fast, _) = runs
    assert rt_seconds >= FRAMES * 0.08 - 0.1  # really paced at 80 ms per frame
    np.testing.assert_allclose(realtime, fast, atol=2e-4)  # greedy: same answer at any pace


def test_busy_server_is_a_clean_error(server, speech, tmp_path, capsys):
    wait_until_idle(server)
    holding, release = threading.Event(), threading.Event()

    async def hold_the_slot() -> None:
        client = await DuplexClient.connect(server.url)
        holding.set()
        await asyncio.to_thread(release.wait, 30)
        await client.close()

    holder = threading.Thread(target=asyncio.run, args=(hold_the_slot(),))
    holder.start()
    try:
        assert holding.wait(30)
        code = talk(server.url, "--input", str(speech), "--output", str(tmp_path / "x.wav"), "--fast")
    finally:
        release.set()
        holder.join(30)
    err = capsys.readouterr().err
    assert code == 1
    assert "error: server busy" in err and "Traceback" not in err
    assert not (tmp_path / "x.wav").exists()


def test_unreachable_server_and_bad_input_are_clean_errors(server, speech, tmp_path, capsys):
    from server_harness import free_port

    assert talk(f"ws://127.0.0.1:{free_port()}/api/chat", "--input", str(speech), "--fast") == 1
    err = capsys.readouterr().err
    assert "error: cannot connect to ws://127.0.0.1" in err and "Traceback" not in err
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt garbage")
    assert talk(server.url, "--input", str(bad), "--fast") == 1
    assert "is not a readable audio file" in capsys.readouterr().err
    assert talk(server.url, "--output", str(tmp_path / "o.wav")) == 1
    assert "--output needs --input" in capsys.readouterr().err
    assert talk(server.url, "--input", str(speech), "--text-topk", "0", "--fast") == 1
    assert "text_topk" in capsys.readouterr().err  # the server's kind-5 about the bad parameter


class FakeSoundDevice:
    """A sounddevice stand-in: the 'microphone' plays ``source`` quickly, the 'speaker' records."""

    PortAudioError = OSError

    def __init__(self, source: np.ndarray) -> None:
        self.source = source
        self.played: list[np.ndarray] = []
        self.nonzero_samples = 0  # samples of model audio played so far
        fake = self

        class Stream:
            def __init__(self, samplerate, channels, dtype, blocksize, device, callback):
                assert (samplerate, channels, dtype, blocksize) == (24000, 1, "float32", FRAME_SIZE)
                self.callback, self.stop = callback, threading.Event()
                self.thread = threading.Thread(target=self.run, daemon=True)

            def __enter__(self):
                self.thread.start()
                return self

            def __exit__(self, *exc):
                self.stop.set()
                self.thread.join(5)

        class InputStream(Stream):
            def run(self):
                for start in range(0, fake.source.size, FRAME_SIZE):
                    if self.stop.wait(0.02):
                        return
                    self.callback(fake.source[start : start + FRAME_SIZE, None], FRAME_SIZE, None, None)

        class OutputStream(Stream):
            def run(self):
                while not self.stop.wait(0.01):
                    block = np.zeros((FRAME_SIZE, 1), np.float32)
                    self.callback(block, FRAME_SIZE, None, None)
                    fake.played.append(block[:, 0].copy())
                    fake.nonzero_samples += int(np.count_nonzero(block))

        self.InputStream, self.OutputStream = InputStream, OutputStream


def test_live_call_with_a_fake_sound_device(server, monkeypatch):
    from duplex.client import live_talk

    wait_until_idle(server)
    fake = FakeSoundDevice(synth_audio(FRAMES, seed=3))
    monkeypatch.setattr(live_talk, "import_sounddevice", lambda: fake)
    pieces: list[str] = []

    heard_enough = (FRAMES - 3) * FRAME_SIZE

    async def call() -> None:
        client = await DuplexClient.connect(server.url)
        talking = asyncio.ensure_future(live_talk.talk_live(client, pieces.append))
        try:  # the user hangs up once the answer was heard (a generous deadline on a loaded machine)
            deadline = asyncio.get_running_loop().time() + 30
            while fake.nonzero_samples < heard_enough and not talking.done():
                assert asyncio.get_running_loop().time() < deadline, "the answer did not reach the speaker"
                await asyncio.sleep(0.05)
        finally:
            talking.cancel()
            await asyncio.gather(talking, return_exceptions=True)
            await client.close()

    asyncio.run(call())
    played = np.concatenate(fake.played)
    # about one model frame per microphone frame reached the speaker
    assert np.count_nonzero(played) >= heard_enough
    assert "".join(pieces).strip()


def test_missing_microphone_is_a_clean_error_before_connecting(server, monkeypatch, capsys):
    from duplex.client import live_talk

    class NoDevices:
        PortAudioError = OSError

        @staticmethod
        def check_input_settings(**kwargs):
            raise OSError("Error querying device -1")

        check_output_settings = check_input_settings

    monkeypatch.setattr(live_talk, "import_sounddevice", lambda: NoDevices)
    wait_until_idle(server)
    ended = server.service.metrics.registry.get_sample_value("duplex_sessions_ended_total", {"reason": "client_closed"})
    assert talk(server.url) == 1
    err = capsys.readouterr().err
    assert "error: no usable microphone" in err and "--input in.wav" in err and "Traceback" not in err
    time.sleep(0.1)
    # the check ran before connecting: no session was opened and closed
    assert server.service.metrics.registry.get_sample_value(
        "duplex_sessions_ended_total", {"reason": "client_closed"}) == ended
