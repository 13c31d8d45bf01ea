"""``duplex finetune``: LoRA training of the LM on your own dialogues (moshi-finetune's dataset format).

Input: a ``.jsonl`` of stereo WAVs (left = the model's voice, right = the user) with sidecar
alignments (see ``duplex.model.finetune_data``). Output: ``lora.safetensors`` + ``config.json`` in
upstream's format (serve it with ``--lora-weight`` or ``--adapter NAME=PATH``), or with ``--full``
the whole LM (``model.safetensors`` + ``config.json``, published layout).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from err
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from duplex.bundle_args import add_model_arguments

    parser.add_argument("data", type=Path, help="training set: a .jsonl of {\"path\", \"duration\"} stereo WAVs "
                        "(left = the model's voice, right = the user), each with a sidecar .json of alignments")
    parser.add_argument("--output", "-o", type=Path, required=True,
                        help="output folder: lora.safetensors + config.json, and checkpoints/ during training")
    train = parser.add_argument_group("training (defaults: moshi-finetune's example for Moshi 7B)")
    train.add_argument("--rank", type=_positive(int), default=128, help="LoRA rank r (default 128)")
    train.add_argument("--scaling", type=float, default=2.0,
                       help="LoRA scaling: y = Wx + scaling * B(Ax) (a plain multiplier; default 2)")
    train.add_argument("--full", action="store_true", help="train all weights instead of a LoRA adapter")
    train.add_argument("--lr", type=_positive(float), default=2e-6, help="peak learning rate (default 2e-6)")
    train.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    train.add_argument("--warmup-fraction", type=float, default=0.05,
                       help="fraction of the steps spent warming up before the cosine decay (default 0.05)")
    train.add_argument("--steps", type=_positive(int), default=2000, help="optimizer steps (default 2000)")
    train.add_argument("--batch-size", type=_positive(int), default=16, help="windows per step (default 16)")
    train.add_argument("--duration", type=_positive(float), default=100.0,
                       help="seconds per training window (default 100)")
    train.add_argument("--max-norm", type=_positive(float), default=1.0, help="gradient clipping norm (default 1)")
    train.add_argument("--text-padding-weight", type=float, default=0.5,
                       help="loss weight of padding targets in the text stream (default 0.5)")
    train.add_argument("--first-codebook-weight-multiplier", type=float, default=100.0,
                       help="loss weight of the first (semantic) audio codebook relative to the others (default 100)")
    train.add_argument("--no-gradient-checkpointing", action="store_true",
                       help="keep every activation (faster, more memory); default: recompute per layer")
    train.add_argument("--checkpoint-every", type=int, default=100,
                       help="save a resumable checkpoint every N steps (0 = never; default 100)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    train.add_argument("--seed", type=int, default=0, help="seed of the adapter's initialisation and data order")
    train.add_argument("--main-speaker", default="SPEAKER_MAIN",
                       help="speaker label of the model's words in the alignments (default SPEAKER_MAIN)")
    train.add_argument("--threads", type=_positive(int), default=None, help="CPU threads for torch")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, OSError) as err:
        print(f"duplex finetune: error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from duplex.bundle_args import load_models
    from duplex.sources import ModelSourceError

    from .finetune_data import encode_sample, read_manifest
    from .finetune_train import Trainer, TrainOptions, latest_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if getattr(args, "adapter", None):
        raise ValueError("--adapter is for serving; to train on top of an adapter, merge it with --lora-weight")
    samples = read_manifest(args.data)  # cheap checks before the models load
    check_speaker(samples, args.main_speaker)
    if args.resume and latest_checkpoint(args.output) is None:
        raise ValueError(f"--resume: no checkpoint under {args.output / 'checkpoints'}")
    try:
        models = load_models(args)
    except ModelSourceError as err:
        raise ValueError(str(err)) from err
    lm = models.lm
    if models.dtype != torch.float32 and models.device.type == "cpu":
        logger.warning("training in %s on the CPU; float32 is the CPU default", models.dtype)
    for sample in samples:
        sample.codes = encode_sample(sample, models.mimi, lm.config, models.tokenizer.encode, args.main_speaker)
    frames = sum(s.codes.shape[-1] for s in samples)
    logger.info("%d dialogue(s), %.1f min of audio", len(samples), frames / models.mimi.frame_rate / 60)
    options = TrainOptions(
        out_dir=args.output, rank=args.rank, scaling=args.scaling, full=args.full, lr=args.lr,
        weight_decay=args.weight_decay, warmup_fraction=args.warmup_fraction, max_steps=args.steps,
        batch_size=args.batch_size, duration=args.duration, max_norm=args.max_norm,
        text_padding_weight=args.text_padding_weight,
        first_codebook_weight_multiplier=args.first_codebook_weight_multiplier,
        gradient_checkpointing=not args.no_gradient_checkpointing, checkpoint_every=args.checkpoint_every,
        seed=args.seed, progress=not args.no_progress, base_config=base_config(models.config, lm.config))
    trainer = Trainer(lm, samples, options)
    if args.resume:
        trainer.resume()
    started = time.perf_counter()
    losses = trainer.run()
    if losses:
        per_step = (time.perf_counter() - started) / len(losses)
        print(f"finetune: {len(losses)} step(s), loss {losses[0]:.3f} -> {losses[-1]:.3f}, {per_step:.2f} s/step; "
              f"wrote {args.output}", file=sys.stderr)
    return 0


def check_speaker(samples, main_speaker: str) -> None:
    """Refuse a dataset in which the model never speaks (a wrong --main-speaker, most likely)."""
    speakers = {word.speaker for sample in samples for word in sample.words}
    if speakers and main_speaker not in speakers:
        raise ValueError(f"no word of the alignments is by {main_speaker!r} (speakers found: "
                         f"{', '.join(sorted(speakers))}); pass the model's label with --main-speaker")


def base_config(raw: dict, lm_config) -> dict:
    """The LM's config.json to copy into the output (the preset's fields when there was none)."""
    from duplex.bundle import SOURCE_KEYS

    from .lora import lm_config_keys

    if raw:
        return lm_config_keys(dict(raw))
    fields = asdict(lm_config)
    extra = fields.pop("extra", {}) or {}
    plain = {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}
    return {**plain, **{k: v for k, v in extra.items() if k not in SOURCE_KEYS}}
