"""``duplex talk``: talk to a duplex (or Moshi) server from the terminal.

With no file arguments it uses the microphone and the speaker (sounddevice) and prints the
model's text live. With ``--input in.wav`` it streams the file instead (in real time, or as fast
as the server takes it with ``--fast``), needs no audio device, and writes the model's audio
(``--output``) and text (``--transcript``). Errors are one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from duplex.client.audio import FRAME_SIZE, SAMPLE_RATE, AudioFileError, read_audio, write_wav
from duplex.client.flags import add_temperature_topk_arguments

DEFAULT_URL = "ws://localhost:8998/api/chat"
# command-line flag (dest) -> the server's query parameter
SAMPLING_PARAMS = {
    "text_temperature": "text_temperature",
    "text_topk": "text_topk",
    "audio_temperature": "audio_temperature",
    "audio_topk": "audio_topk",
    "text_seed": "text_seed",
    "audio_seed": "audio_seed",
    "adapter": "adapter",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``duplex talk``."""
    parser.add_argument("--url", default=DEFAULT_URL,
                        help=f"websocket URL of the server's chat endpoint (default {DEFAULT_URL}; "
                        "wss:// for --ssl servers)")
    files = parser.add_argument_group("files instead of microphone and speaker")
    files.add_argument("--input", type=Path, help="audio file to send (any sample rate, mono or stereo)")
    files.add_argument("--output", type=Path, help="write the model's audio to this WAV (24 kHz mono; one "
                       "80 ms frame shorter than the input: the model's acoustic delay)")
    files.add_argument("--transcript", type=Path, help="write the model's text to this file")
    files.add_argument("--fast", action="store_true",
                       help="send the file as fast as the server takes it instead of in real time")
    files.add_argument("--drain-seconds", type=float, default=1.0,
                       help="after the input ends, wait until the server was quiet this long (default 1.0)")
    files.add_argument("--quiet", action="store_true", help="do not print the model's text while it arrives")
    devices = parser.add_argument_group("audio devices (microphone mode)")
    devices.add_argument("--input-device",
                         help="microphone: sounddevice device name or index (default: system default)")
    devices.add_argument("--output-device", help="speaker: sounddevice device name or index (default: system default)")
    sampling = parser.add_argument_group("sampling (sent as query parameters; default: the server's)")
    add_temperature_topk_arguments(sampling)
    sampling.add_argument("--text-seed", type=int, help="seed of the text sampler (independent of the audio's)")
    sampling.add_argument("--audio-seed", type=int, help="seed of the audio sampler (independent of the text's)")
    parser.add_argument("--adapter", metavar="NAME", help="the server's LoRA adapter to talk to (query parameter "
                        "adapter=NAME; see /api/info for the server's adapters; default: the base model)")
    parser.add_argument("--insecure", action="store_true",
                        help="wss:// only: accept a self-signed server certificate (e.g. from `duplex serve --ssl`)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="API key of a server started with --api-key (sent as 'Authorization: Bearer'; "
                        "default: $DUPLEX_API_KEY)")
    parser.add_argument("--connect-timeout", type=float, default=None,
                        help="give up when the session has not started after this many seconds "
                        "(default: wait, also while queued)")


def query_params(args: argparse.Namespace) -> dict[str, object]:
    """The sampling flags that were given, as the server's query parameters."""
    return {param: getattr(args, dest) for dest, param in SAMPLING_PARAMS.items() if getattr(args, dest) is not None}


def main(args: argparse.Namespace) -> int:
    """Run ``duplex talk``; returns the exit code."""
    from duplex.client.client import ServerError
    from duplex.client.live_talk import AudioDeviceError

    try:
        check_file_flags(args)
        pcm = read_audio(args.input) if args.input else None
        return asyncio.run(_talk(args, pcm))
    except (ServerError, AudioFileError, AudioDeviceError, ValueError, OSError) as exc:
        hint = " (a self-signed certificate? add --insecure)" if "CERTIFICATE_VERIFY_FAILED" in str(exc) else ""
        print(f"duplex talk: error: {exc}{hint}", file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print(f"duplex talk: error: no session after {args.connect_timeout:g} s at {args.url}", file=sys.stderr)
        return 1


def check_file_flags(args: argparse.Namespace) -> None:
    """File-only flags need --input; ValueError says which."""
    if args.input is None:
        for flag in ("output", "transcript", "fast"):
            if getattr(args, flag):
                raise ValueError(f"--{flag} needs --input (a file to send)")


async def _talk(args: argparse.Namespace, pcm) -> int:
    from duplex.client.client import DuplexClient
    from duplex.client.live_talk import check_devices

    if pcm is None:
        check_devices(_device(args.input_device), _device(args.output_device))
    api_key = getattr(args, "api_key", None) or os.environ.get("DUPLEX_API_KEY") or None
    client = await DuplexClient.connect(args.url, query_params(args), on_metadata=_show_queue,
                                        timeout=args.connect_timeout, ssl=_ssl_context(args), api_key=api_key)
    on_text = _print_piece if not args.quiet else (lambda piece: None)
    try:
        if pcm is None:
            from duplex.client.live_talk import talk_live

            print("connected: speak now (Ctrl-C to hang up)", file=sys.stderr)
            error = await talk_live(client, on_text, _device(args.input_device), _device(args.output_device))
        else:
            error = await _talk_file(client, pcm, args, on_text)
    finally:
        await client.close()
        if not args.quiet:
            print(file=sys.stdout, flush=True)
    if error:
        print(f"duplex talk: the server ended the session: {error}", file=sys.stderr)
        return 1
    return 0


async def _talk_file(client, pcm, args: argparse.Namespace, on_text) -> str | None:
    from duplex.client.file_talk import stream_file

    conversation = await stream_file(client, pcm, fast=args.fast, drain_seconds=args.drain_seconds,
                                     on_text=on_text)
    received = conversation.pcm
    if args.output is not None:
        write_wav(args.output, received)
    if args.transcript is not None:
        args.transcript.write_text(conversation.transcript + "\n", encoding="utf-8")
    print(f"\nsent {conversation.frames_sent} frames ({pcm.size / SAMPLE_RATE:.2f} s), "
          f"received {received.size / SAMPLE_RATE:.2f} s of audio", file=sys.stderr)
    return conversation.error or unanswered(conversation.frames_sent, received.size, total_frames(pcm))


# The model answers every frame after its acoustic delay (one frame); a little more is tolerated (the
# Opus writer may keep the last frames of a call in an unfinished page).
ANSWER_SLACK_FRAMES = 3


def total_frames(pcm) -> int:
    return -(-pcm.size // FRAME_SIZE)


def unanswered(frames_sent: int, samples_received: int, frames_total: int) -> str | None:
    """Why the call ended before all audio was answered, or None when it was."""
    if frames_sent < frames_total:
        return f"the call ended after {frames_sent} of {frames_total} frames were sent"
    answered = samples_received // FRAME_SIZE
    if answered < frames_sent - 1 - ANSWER_SLACK_FRAMES:
        return (f"the call ended before all audio was answered: {answered} of {frames_sent - 1} frames "
                "came back")
    return None


def _print_piece(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _show_queue(data: dict) -> None:
    if data.get("type") == "queue":
        print(f"waiting for a free slot: position {data.get('queue_position')}", file=sys.stderr)


def _ssl_context(args: argparse.Namespace):
    """For wss:// URLs: a verifying TLS context, or with --insecure one that accepts any certificate."""
    if not args.url.startswith("wss://"):
        return None
    import ssl

    context = ssl.create_default_context()
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _device(name: str | None):
    """A sounddevice device: an index when numeric, else the name (None = default)."""
    if name is None:
        return None
    return int(name) if name.isdigit() else name
