"""The `duplex` command: serve, talk, infer, finetune and bench.

Each subcommand lives in the package that owns it and exposes two functions,
``add_arguments(parser)`` and ``main(args) -> int``; this module only wires them
together and imports a subcommand's module when that subcommand runs, so that
`duplex --help` stays fast and nothing heavy happens at import time.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("duplex.server.cli", "run the real-time websocket server (web UI at /)"),
    "talk": ("duplex.client.cli", "talk to a server from the terminal (microphone or WAV files)"),
    "infer": ("duplex.client.infer", "run the whole model offline on WAV files, no server"),
    "finetune": ("duplex.model.finetune", "train a LoRA adapter (or all weights) on your own dialogues"),
}
BENCHMARKS: dict[str, tuple[str, str]] = {
    "codec": ("duplex.codec.bench", "Mimi encode_step / decode_step latency per 80 ms frame"),
    "lm": ("duplex.model.bench", "LM step latency (temporal + depth), tokens/s, peak memory"),
    "load": ("duplex.model.bench_load", "load a full-size LM checkpoint: load time, peak RSS, first steps"),
    "server": ("duplex.client.bench_server", "one real-time client over loopback: per-frame latency"),
    "serve": ("duplex.server.bench_serve", "N concurrent real-time clients: batched tick latency"),
    "engine": ("duplex.server.bench_engine", "engine step cost with few active slots on a big engine"),
    "engine-process": ("duplex.server.bench_engine_process",
                       "model step wall time, engine in the server's process vs a child, idle vs busy interpreter"),
    "flood": ("duplex.server.bench_flood",
              "idle connections and fast senders against a server: a real-time call's longest audio gap"),
    "lora": ("duplex.model.lora_bench", "a batch of slots on several LoRA adapters against the base model"),
    "finetune": ("duplex.model.finetune_bench", "one LoRA training step (forward, backward, AdamW)"),
}


def _add_lazy(subparsers, name: str, module: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(_module=module)
    # Arguments are added only for the subcommand actually named on the command line.
    parser.set_defaults(_lazy_parser=parser)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duplex", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        _add_lazy(sub, name, module, help_text)
    bench = sub.add_parser("bench", help="benchmarks that print their figures", description="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        _add_lazy(bench_sub, name, module, help_text)
    _add_arguments_of_chosen(parser, sub, bench_sub, argv)
    return parser


def _add_arguments_of_chosen(parser, sub, bench_sub, argv: list[str]) -> None:
    """Import only the module of the subcommand named in argv and let it add its flags."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return
    if words[0] == "bench":
        if len(words) > 1 and words[1] in BENCHMARKS:
            _load_arguments(bench_sub.choices[words[1]], BENCHMARKS[words[1]][0])
    elif words[0] in COMMANDS:
        _load_arguments(sub.choices[words[0]], COMMANDS[words[0]][0])


def _load_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    importlib.import_module(module).add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module = importlib.import_module(args._module)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
