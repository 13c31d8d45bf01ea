"""`duplex infer`: the tiny models end to end through the server's engine, batch of files, and the
pipeline_tiny reference (greedy, float32 on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
from safetensors.torch import load_file

from duplex.cli import main as duplex_main
from duplex.client.audio import FRAME_SIZE, read_audio
from duplex.client.infer import run_batch
from duplex.server.engine import SlotSampling
from duplex.bundle import load_models_from_paths
from server_harness import reference_server_run


@pytest.fixture(scope="module")
def pipeline(fixtures_dir):
    return load_file(str(fixtures_dir / "pipeline_tiny/io.safetensors"))


@pytest.fixture(scope="module")
def tiny_models(fixtures_dir, tiny_tokenizer_path):
    return load_models_from_paths(
        fixtures_dir / "lm_tiny/model.safetensors", fixtures_dir / "mimi_tiny/model.safetensors",
        tiny_tokenizer_path, config=fixtures_dir / "lm_tiny/config.json",
        mimi_config=fixtures_dir / "mimi_tiny/config.json",
    )


def model_flags(fixtures_dir, tokenizer) -> list[str]:
    return [
        "--moshi-weight", str(fixtures_dir / "lm_tiny/model.safetensors"),
        "--mimi-weight", str(fixtures_dir / "mimi_tiny/model.safetensors"),
        "--mimi-config", str(fixtures_dir / "mimi_tiny/config.json"),
        "--tokenizer", str(tokenizer), "--device", "cpu", "--no-progress",
    ]


def test_batch_matches_the_reference_server(tiny_models, pipeline):
    """Each file's answer is the reference server's for the same audio: N frames in, N - 1 out."""
    audio_in = pipeline["audio_in"][:, 0].numpy()  # [2, 96000] = 50 frames each
    results = run_batch(tiny_models, [audio_in[0], audio_in[1]], SlotSampling())  # lm_tiny: greedy
    for b, result in enumerate(results):
        ref_tokens, ref_pcm = reference_server_run(tiny_models, audio_in[b])
        assert result.tokens.shape == (9, 49)
        np.testing.assert_array_equal(result.tokens, ref_tokens)
        assert result.pcm.shape == (94080,)
        np.testing.assert_allclose(result.pcm, ref_pcm, atol=1e-5)
        pieces = [tiny_models.tokenizer.piece(t) for t in ref_tokens[0].tolist()]
        assert result.transcript == "".join(p for p in pieces if p).strip()


def test_slots_are_independent_of_batch_neighbours(tiny_models, pipeline):
    long = pipeline["audio_in"][0, 0].numpy()
    short = pipeline["audio_in"][1, 0].numpy()[: 20 * FRAME_SIZE + 100]  # 21 frames
    alone = run_batch(tiny_models, [short])[0]
    together = run_batch(tiny_models, [long, short])
    assert together[1].tokens.shape == (9, 21 - 1)  # the acoustic delay of 1 (the first frame's step)
    np.testing.assert_array_equal(together[1].tokens, alone.tokens)
    np.testing.assert_allclose(together[1].pcm, alone.pcm, atol=1e-6)
    assert together[0].tokens.shape == (9, 49)


def test_cli_batch_of_two_files_is_deterministic(fixtures_dir, tiny_tokenizer_path, pipeline, tmp_path, capsys):
    stereo_44k = tmp_path / "a.wav"
    mono = pipeline["audio_in"][0, 0].numpy()
    soundfile.write(stereo_44k, np.stack([mono[:72000], mono[:72000]], axis=1), 24000, subtype="FLOAT")
    second = tmp_path / "b.wav"
    soundfile.write(second, pipeline["audio_in"][1, 0].numpy()[:30000], 16000, subtype="PCM_16")
    flags = model_flags(fixtures_dir, tiny_tokenizer_path)
    for run in ("one", "two"):
        out = tmp_path / run
        code = duplex_main(["infer", str(stereo_44k), str(second), "--output-dir", str(out), *flags])
        assert code == 0, capsys.readouterr().err
    for name, seconds in (("a", 3.0), ("b", 30000 / 16000)):
        first, again = read_audio(tmp_path / "one" / f"{name}.wav"), read_audio(tmp_path / "two" / f"{name}.wav")
        frames_in = int(np.ceil(seconds * 24000 / FRAME_SIZE))
        assert first.size == (frames_in - 1) * FRAME_SIZE
        np.testing.assert_array_equal(first, again)
        text = (tmp_path / "one" / f"{name}.txt").read_text()
        assert text.strip() and text == (tmp_path / "two" / f"{name}.txt").read_text()
    assert "2 file(s)" in capsys.readouterr().err


def test_cli_single_file_with_transcript_and_seeded_sampling(fixtures_dir, tiny_tokenizer_path, pipeline, tmp_path):
    source = tmp_path / "in.wav"
    soundfile.write(source, pipeline["audio_in"][0, 0].numpy()[:24000], 24000, subtype="FLOAT")
    flags = model_flags(fixtures_dir, tiny_tokenizer_path)
    outputs = []
    for run, seed in (("s1", 5), ("s2", 5), ("s3", 6)):
        argv = ["infer", str(source), str(tmp_path / f"{run}.wav"), "--transcript", str(tmp_path / f"{run}.txt"),
                "--text-temperature", "1.0", "--audio-temperature", "1.0", "--seed", str(seed), *flags]
        assert duplex_main(argv) == 0
        outputs.append(read_audio(tmp_path / f"{run}.wav"))
    np.testing.assert_array_equal(outputs[0], outputs[1])  # same seed, same sample
    assert not np.array_equal(outputs[0], outputs[2])  # another seed, another sample
    assert (tmp_path / "s1.txt").read_text() == (tmp_path / "s2.txt").read_text()


def test_cli_errors_are_one_line(fixtures_dir, tiny_tokenizer_path, tmp_path, capsys):
    flags = model_flags(fixtures_dir, tiny_tokenizer_path)
    assert duplex_main(["infer", str(tmp_path / "missing.wav"), str(tmp_path / "o.wav"), *flags]) == 1
    err = capsys.readouterr().err
    assert "error: audio file not found" in err and "Traceback" not in err
    good = tmp_path / "in.wav"
    soundfile.write(good, np.zeros(4000, np.float32), 24000)
    bad_flags = [f if "lm_tiny/model" not in f else str(tmp_path / "none.safetensors") for f in flags]
    assert duplex_main(["infer", str(good), str(tmp_path / "o.wav"), *bad_flags]) == 1
    err = capsys.readouterr().err
    assert "Moshi LM weights: file not found" in err and "Traceback" not in err
    assert duplex_main(["infer", str(good), str(good), str(tmp_path / "o.wav"), *flags]) == 1
    assert "--output-dir" in capsys.readouterr().err


def test_cli_batch_size_chunks_files_without_changing_outputs(fixtures_dir, tiny_tokenizer_path, pipeline, tmp_path,
                                                              capsys):
    """Three files of different lengths: two chunks (--batch-size 2) give what one batch of 3 gives."""
    audio = pipeline["audio_in"][:, 0].numpy()  # [2, 96000]
    sources = []
    for name, (row, frames) in {"a": (0, 9), "b": (1, 14), "c": (0, 6)}.items():
        sources.append(tmp_path / f"{name}.wav")
        soundfile.write(sources[-1], audio[row, 5000 : 5000 + frames * FRAME_SIZE - 300], 24000, subtype="FLOAT")
    flags = model_flags(fixtures_dir, tiny_tokenizer_path)
    for size in ("2", "3"):
        argv = ["infer", *map(str, sources), "--output-dir", str(tmp_path / size), "--batch-size", size, "--greedy"]
        assert duplex_main([*argv, *flags]) == 0, capsys.readouterr().err
    for name, frames in (("a", 9), ("b", 14), ("c", 6)):
        chunked, together = (read_audio(tmp_path / size / f"{name}.wav") for size in ("2", "3"))
        assert chunked.size == (frames - 1) * FRAME_SIZE
        # Same tokens; the audio may differ in the last bit of 16-bit PCM (float sums depend on the batch size).
        np.testing.assert_allclose(chunked, together, rtol=0, atol=2 / 32768)
        assert (tmp_path / "2" / f"{name}.txt").read_text() == (tmp_path / "3" / f"{name}.txt").read_text()
    with pytest.raises(SystemExit):
        duplex_main(["infer", *map(str, sources), "--output-dir", str(tmp_path), "--batch-size", "0", *flags])
    assert "--batch-size: must be at least 1" in capsys.readouterr().err
