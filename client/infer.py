"""``duplex infer``: the whole model on WAV files, no server.

Every input file gets one batch slot of :class:`duplex.server.engine.DuplexEngine` (the very
engine the server steps), so a file's output is exactly what a server session would send for it:
the acoustic delay holds back the model's first ``max(delays)`` frames (the first frame's step
included), so the output is ``max(delays)`` frames (80 ms for Moshi) shorter than the input.
Files run in chunks of at most ``--batch-size`` slots (each slot holds its own KV cache), files of
similar length together; shorter files in a chunk are fed silence once they end and their extra
outputs are discarded. Slots are independent, so the chunking does not change any file's output.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duplex.client.audio import FRAME_SIZE, SAMPLE_RATE, AudioFileError, frame_count, read_audio, write_wav
from duplex.client.flags import add_temperature_topk_arguments
from duplex.client.text import TranscriptBuilder
from duplex.bundle_args import ModelSourceError, add_model_arguments, load_models

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


@dataclass
class InferJob:
    """One input file and where its outputs go."""

    source: Path
    audio_out: Path
    transcript_out: Path | None


@dataclass
class InferResult:
    """The model's side of one conversation."""

    pcm: np.ndarray  # [T] float32 at 24 kHz
    tokens: np.ndarray  # [1 + dep_q, S] int64: text token then model audio codes, per output frame
    transcript: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``duplex infer``."""
    parser.add_argument(
        "paths", nargs="+", metavar="FILE",
        help="input audio (any rate, mono or stereo) followed by the output WAV: `in.wav out.wav` (the output "
        "is one 80 ms frame shorter: the model's acoustic delay); with --output-dir every FILE is an input",
    )
    parser.add_argument(
        "--output-dir", type=Path,
        help="write DIR/<input name>.wav and DIR/<input name>.txt for each input (batch of files, one slot each)",
    )
    parser.add_argument("--transcript", type=Path, help="write the model's text (inner monologue) to this file")
    parser.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, metavar="N",
        help=f"run at most N files at once (default {DEFAULT_BATCH_SIZE}); each file holds one engine slot with "
        "its own KV cache (about 1.6 GB for the 7B model in bfloat16), so memory grows with N: lower it if the "
        "device runs out of memory, raise it for throughput. Outputs do not depend on it",
    )
    add_sampling_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_model_arguments(parser)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """Sampling overrides applied to every slot, resolved exactly as a server session's query parameters."""
    group = parser.add_argument_group("sampling (default: the model repository's lm_gen_config)")
    add_temperature_topk_arguments(group)
    group.add_argument("--greedy", action="store_true",
                       help="always take the most likely token (same as both temperatures 0)")
    group.add_argument("--seed", type=int, help="random seed of both samplers, text and audio (same seed, same "
                       "output; default random); a server session gets the same with text_seed = audio_seed = SEED")


def main(args: argparse.Namespace) -> int:
    """Run ``duplex infer``; user errors are printed as one line, exit code 1."""
    try:
        jobs = plan_jobs(args.paths, args.output_dir, args.transcript)
        inputs = [read_audio(job.source) for job in jobs]
        models = load_models(args)
        sampling = sampling_from_args(args, models.lm_gen_defaults)
        started = time.perf_counter()
        results = run_batch(models, inputs, sampling, progress=not args.no_progress, batch_size=args.batch_size)
        elapsed = time.perf_counter() - started
    except (ModelSourceError, AudioFileError, ValueError) as exc:
        print(f"duplex infer: error: {exc}", file=sys.stderr)
        return 1
    for job, result in zip(jobs, results):
        try:
            write_outputs(job, result)
        except (AudioFileError, OSError) as exc:
            print(f"duplex infer: error: {exc}", file=sys.stderr)
            return 1
    seconds = sum(x.size for x in inputs) / SAMPLE_RATE
    print(f"{len(jobs)} file(s), {seconds:.1f} s of audio in {elapsed:.1f} s "
          f"({seconds / max(elapsed, 1e-9):.2f}x real time)", file=sys.stderr)
    return 0


def plan_jobs(paths: list[str], output_dir: Path | None, transcript: Path | None) -> list[InferJob]:
    """Pair inputs with outputs; ValueError explains a bad combination."""
    if output_dir is not None:
        if transcript is not None and len(paths) > 1:
            raise ValueError("--transcript names one file; with several inputs the transcripts go to --output-dir")
        output_dir.mkdir(parents=True, exist_ok=True)
        stems = [Path(p).stem for p in paths]
        if len(set(stems)) != len(stems):
            raise ValueError("inputs with the same file name would overwrite each other in --output-dir")
        return [InferJob(Path(p), output_dir / f"{Path(p).stem}.wav",
                         transcript or output_dir / f"{Path(p).stem}.txt") for p in paths]
    if len(paths) != 2:
        raise ValueError("give one input and one output (`duplex infer in.wav out.wav`), "
                         "or several inputs with --output-dir DIR")
    source, target = Path(paths[0]), Path(paths[1])
    if target.suffix.lower() != ".wav":
        raise ValueError(f"the output {target} must be a .wav file (or use --output-dir for several inputs)")
    return [InferJob(source, target, transcript)]


def infer_adapter(args: argparse.Namespace) -> str | None:
    """The adapter every file runs with: the last ``--adapter NAME=PATH`` (None: the base model)."""
    from duplex.model.lora_multi import parse_adapter_spec

    specs = getattr(args, "adapter", None) or []
    return parse_adapter_spec(specs[-1])[0] if specs else None


def sampling_from_args(args: argparse.Namespace, defaults: dict):
    """The per-slot SlotSampling that a server session with the same query parameters would get."""
    from duplex.server.protocol import SessionParams
    from duplex.server.service import resolve_sampling

    params = SessionParams(
        text_temperature=0.0 if args.greedy else args.text_temperature,
        audio_temperature=0.0 if args.greedy else args.audio_temperature,
        text_topk=args.text_topk, audio_topk=args.audio_topk, text_seed=args.seed, audio_seed=args.seed,
        adapter=infer_adapter(args),
    )
    # The server's own resolution (defaults, "a temperature asks for sampling", seeds).
    sampling, _ = resolve_sampling(params, defaults)
    return sampling


def run_batch(models, inputs: list[np.ndarray], sampling=None, progress: bool = False,
              batch_size: int | None = None) -> list[InferResult]:
    """Stream every input (mono float32 at 24 kHz) through an engine slot, frame by frame, at most
    ``batch_size`` slots at once (None = all inputs together). Results are in input order."""
    if not inputs:
        raise ValueError("no input audio")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    chunks = plan_chunks([frame_count(x.size) for x in inputs], batch_size or len(inputs))
    results: list[InferResult | None] = [None] * len(inputs)
    for number, chunk in enumerate(chunks, 1):
        desc = "infer" if len(chunks) == 1 else f"infer {number}/{len(chunks)}"
        for index, result in zip(chunk, run_chunk(models, [inputs[i] for i in chunk], sampling, progress, desc)):
            results[index] = result
    return results


def plan_chunks(frames_per_input: list[int], batch_size: int) -> list[list[int]]:
    """Input indices in chunks of at most ``batch_size``, longest files first and together, so that
    each chunk (padded to its longest file) wastes few steps on silence."""
    order = sorted(range(len(frames_per_input)), key=lambda i: -frames_per_input[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def run_chunk(models, inputs: list[np.ndarray], sampling, progress: bool, desc: str) -> list[InferResult]:
    """One engine with a slot per input, stepped until the longest input ends."""
    from tqdm import tqdm

    from duplex.server.engine import DuplexEngine

    engine = DuplexEngine(models.mimi, models.lm, batch_size=len(inputs),
                          lm_gen_kwargs=models.lm_gen_defaults, device=models.device)
    for slot in range(len(inputs)):
        engine.join(slot, sampling)
    frames_per_input = [frame_count(x.size) for x in inputs]
    total = max(frames_per_input)
    batch = np.zeros((len(inputs), total * FRAME_SIZE), dtype=np.float32)  # [B, T]
    for slot, pcm in enumerate(inputs):
        batch[slot, : pcm.size] = pcm
    outputs: list[list[np.ndarray]] = [[] for _ in inputs]
    tokens: list[list[np.ndarray]] = [[] for _ in inputs]
    texts = [TranscriptBuilder(models.tokenizer) for _ in inputs]
    for t in tqdm(range(total), desc=desc, unit="frame", disable=not progress):
        step = engine.step(batch[:, t * FRAME_SIZE : (t + 1) * FRAME_SIZE])  # [B, 1920] in and out
        for slot in np.flatnonzero(step.has_output):
            if t < frames_per_input[slot]:
                outputs[slot].append(step.pcm[slot].copy())
                tokens[slot].append(step.tokens[slot].copy())
                texts[slot].add(int(step.tokens[slot, 0]))
    width = 1 + models.lm.config.dep_q
    return [
        InferResult(
            pcm=np.concatenate(chunks) if chunks else np.zeros(0, np.float32),
            tokens=np.stack(toks, axis=1) if toks else np.zeros((width, 0), np.int64),
            transcript=text.text(),
        )
        for chunks, toks, text in zip(outputs, tokens, texts)
    ]


def write_outputs(job: InferJob, result: InferResult) -> None:
    """Write the model audio WAV and, when asked, the transcript."""
    write_wav(job.audio_out, result.pcm)
    logger.info("wrote %s (%.2f s)", job.audio_out, result.pcm.size / SAMPLE_RATE)
    if job.transcript_out is not None:
        job.transcript_out.write_text(result.transcript + "\n", encoding="utf-8")
        logger.info("wrote %s", job.transcript_out)
