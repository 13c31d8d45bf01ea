"""duplex finetune: the text stream, the loss, and proof that training learns a dialogue."""

from __future__ import annotations

import pytest
import torch
from duplex.model.finetune_demo import make_demo_dataset as make_dataset
from lm_test_utils import fixture_lm, run
from safetensors import safe_open
from server_harness import load_tiny_models

from duplex.model.finetune_data import Word, encode_sample, read_manifest, text_stream
from duplex.model.finetune_train import Trainer, TrainOptions, training_loss
from duplex.model.generate import LMGen
from duplex.model.lm import LMOutput
from duplex.model.lora import merge_adapter, read_adapter
from duplex.model.lora_multi import attach_adapters

PAD, EPAD = 3, 0


def test_text_stream_places_words_from_their_first_frame():
    vocab = {"a": [10], "bc": [11, 12], "d": [13], "x": [14]}
    words = [Word("a", 0.0, 0.1, "SPEAKER_MAIN"), Word("bc", 0.3, 0.5, "SPEAKER_MAIN"),
             Word("x", 0.35, 0.4, "OTHER"), Word("d", 0.32, 0.4, "SPEAKER_MAIN")]
    stream = text_stream(sorted(words, key=lambda w: w.start), 8, 12.5, vocab.__getitem__, PAD)
    # "a" at frame 0 (no frame before it); "bc" from ceil(0.3 * 12.5) = 4, the padding before it
    # becomes end-of-padding; "d" starts at 0.32 s but frames 4-5 are taken: it goes out at 6.
    assert stream.tolist() == [10, PAD, PAD, EPAD, 11, 12, 13, PAD]


def test_loss_weights_padding_and_first_codebook():
    torch.manual_seed(0)
    codes = torch.tensor([[[PAD, 5], [1, 2], [3, 4]]])  # [1, 1 + dep_q, T] text + 2 codebooks
    out = LMOutput(logits=torch.randn(1, 2, 2, 8), mask=torch.ones(1, 2, 2, dtype=torch.bool),
                   text_logits=torch.randn(1, 1, 2, 9), text_mask=torch.ones(1, 1, 2, dtype=torch.bool))
    text_ce = torch.nn.functional.cross_entropy(out.text_logits[0, 0], codes[0, 0], reduction="none")
    audio_ce = torch.nn.functional.cross_entropy(out.logits[0].flatten(0, 1), codes[0, 1:].flatten(),
                                                 reduction="none").view(2, 2)
    terms = training_loss(out, codes, PAD, text_padding_weight=0.25, first_codebook_weight_multiplier=10.0)
    torch.testing.assert_close(terms.text, (0.25 * text_ce[0] + text_ce[1]) / 1.25)
    torch.testing.assert_close(terms.audio, (10 * audio_ce[0].sum() + audio_ce[1].sum()) / 22)
    torch.testing.assert_close(terms.total, terms.text + terms.audio)


@pytest.fixture(scope="module")
def tiny(fixtures_dir, tiny_tokenizer_path, tmp_path_factory):
    models = load_tiny_models(fixtures_dir, tiny_tokenizer_path)
    manifest = make_dataset(tmp_path_factory.mktemp("dialogues"), models.tokenizer)
    samples = read_manifest(manifest)
    for sample in samples:
        sample.codes = encode_sample(sample, models.mimi, models.lm.config, models.tokenizer.encode)
    return models, samples


def greedy_text(lm, user_codes: torch.Tensor, adapters=None) -> torch.Tensor:
    """Text frames [T] that greedy generation produces when fed user_codes [Ku, T] (frame f at step f + 1)."""
    gen = LMGen(lm, use_sampling=False)
    steps = user_codes.shape[-1]
    feed = torch.cat([user_codes[:, :1], user_codes, user_codes[:, -1:].expand(-1, gen.max_delay)], dim=1)
    state = gen.init_state(1)
    if adapters is not None:
        adapters.selection.set_slot(0, 1)
    tokens, _ = run(gen, state, feed[None, :, : steps + gen.max_delay])
    return tokens[0, 0, gen.max_delay: gen.max_delay + steps]


def text_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """Share of the sample's non-padding text frames (words and end-of-padding) reproduced exactly."""
    keep = target != PAD
    return float((predicted[keep] == target[keep]).float().mean())


def test_training_learns_the_dialogue(tiny, fixtures_dir, tmp_path):
    models, samples = tiny
    lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
    options = TrainOptions(out_dir=tmp_path / "adapter", rank=8, scaling=2.0, lr=3e-3, max_steps=200,
                           batch_size=2, duration=4.0, gradient_checkpointing=False, checkpoint_every=0,
                           progress=False, base_config={"dim": 64})
    torch.manual_seed(0)
    losses = Trainer(lm, samples, options).run()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last <= 0.5 * first, (first, last)
    # The output reads exactly as upstream adapters do: same key names and shapes as the fixture's (rank aside).
    with safe_open(str(tmp_path / "adapter" / "lora.safetensors"), "pt") as ours, \
            safe_open(str(fixtures_dir / "lm_tiny_lora" / "lora.safetensors"), "pt") as theirs:
        assert set(ours.keys()) == set(theirs.keys())
        for key in theirs.keys():
            shape = list(theirs.get_slice(key).get_shape())
            shape[0 if key.endswith("lora_A.weight") else 1] = 8
            assert list(ours.get_slice(key).get_shape()) == shape, key
    base, _ = fixture_lm(fixtures_dir, "lm_tiny")
    tuned, _ = fixture_lm(fixtures_dir, "lm_tiny")
    adapter = read_adapter(tmp_path / "adapter" / "lora.safetensors", tuned)
    assert adapter.rank == 8 and adapter.scaling == 2.0
    merge_adapter(tuned, adapter)
    batched, _ = fixture_lm(fixtures_dir, "lm_tiny")
    adapters = attach_adapters(batched, [adapter], batch_size=1)
    for sample in samples:
        target, user = sample.codes[0], sample.codes[1 + lm.config.dep_q:]
        learned = greedy_text(tuned, user)
        assert text_accuracy(learned, target) >= 0.8
        assert text_accuracy(greedy_text(base, user), target) <= 0.2
        assert torch.equal(greedy_text(batched, user, adapters), learned)


def _short_options(tmp_path, **changes):
    values = dict(out_dir=tmp_path, rank=4, lr=1e-3, max_steps=4, batch_size=2, duration=2.0,
                  gradient_checkpointing=False, checkpoint_every=2, progress=False)
    values.update(changes)
    return TrainOptions(**values)


def test_gradient_checkpointing_gives_the_same_gradients(tiny, fixtures_dir, tmp_path):
    _, samples = tiny
    grads = []
    for checkpointing in (False, True):
        lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
        torch.manual_seed(0)
        trainer = Trainer(lm, samples, _short_options(tmp_path, gradient_checkpointing=checkpointing))
        with torch.no_grad():  # B = 0 would leave A without gradient
            for p in trainer.parameters:
                p.normal_(0, 0.05)
        codes = torch.stack([samples[0].codes[:, :25], samples[1].codes[:, :25]])
        training_loss(lm(codes), codes, PAD, 0.5, 100.0).total.backward()
        grads.append([p.grad.clone() for p in trainer.parameters])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, atol=1e-6, rtol=1e-5)


def test_resume_continues_exactly(tiny, fixtures_dir, tmp_path):
    _, samples = tiny
    results = []
    for folder, interrupted in (("straight", False), ("resumed", True)):
        lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
        torch.manual_seed(0)
        trainer = Trainer(lm, samples, _short_options(tmp_path / folder))
        if interrupted:  # two steps, the step-2 checkpoint, then a new process resumes from it
            trainer.train_step()
            trainer.train_step()
            trainer.save_checkpoint()
            lm, _ = fixture_lm(fixtures_dir, "lm_tiny")
            torch.manual_seed(123)
            trainer = Trainer(lm, samples, _short_options(tmp_path / folder))
            assert trainer.resume() and trainer.step == 2
        trainer.run()
        results.append(read_adapter(tmp_path / folder / "lora.safetensors", fixture_lm(fixtures_dir, "lm_tiny")[0]))
    assert (tmp_path / "straight" / "checkpoints" / "step_000004" / "trainer.pt").is_file()
    for path, (a, b) in results[0].pairs.items():
        torch.testing.assert_close(results[1].pairs[path][0], a)
        torch.testing.assert_close(results[1].pairs[path][1], b)


def test_dataset_errors_name_the_file(tiny, tmp_path):
    import json

    import numpy as np
    import soundfile

    from duplex.model.finetune_data import DatasetError, Sample

    models, _ = tiny
    mono = tmp_path / "mono.wav"
    soundfile.write(str(mono), np.zeros(4800, np.float32), 24000)
    with pytest.raises(DatasetError, match="mono.wav has 1 channel.*stereo"):
        encode_sample(Sample(mono, 0.2, []), models.mimi, models.lm.config, models.tokenizer.encode)
    (tmp_path / "train.jsonl").write_text(json.dumps({"path": "mono.wav", "duration": 0.2}) + "\n")
    with pytest.raises(DatasetError, match="alignments not found: .*mono.json"):
        read_manifest(tmp_path / "train.jsonl")
    (tmp_path / "mono.json").write_text(json.dumps({"alignments": [["hi", [0.1], "SPEAKER_MAIN"]]}))
    with pytest.raises(DatasetError, match=r"mono.json: expected \{\"alignments\""):
        read_manifest(tmp_path / "train.jsonl")
