"""The batched engine in a process of its own (`duplex serve --engine-process`, the default).

The server's event loop (sockets, Opus, websockets) and the model share one interpreter otherwise: each of
the few hundred torch calls of a step gives the GIL up and must win it back from the event-loop thread, so
a busy loop (a connection flood, dozens of sessions' Opus) stretches a 40 ms step to hundreds of ms. Here a
child process loads the models and owns a :class:`~duplex.server.engine.DuplexEngine`; the scheduler's
worker thread in the server drives it through :class:`ProcessEngine`, which has the engine's interface
(``join``, ``leave``, ``move_slot``, ``step``, ``reset_all``) and forwards each call over a pipe.

The server never holds the weights: it gets :class:`RemoteModels` (name, device, dtype, sampling defaults,
adapter names and the tokenizer's pieces) from the child. Failures stay the scheduler's: an exception
in the child is raised again in the server (a failed step is recovered from as before); a child that
exits, or does not answer within ``answer_timeout_s``, raises :class:`EngineProcessDied`, so the worker
stops for good and ``/readyz`` reports the server unavailable. The child ignores SIGINT/SIGTERM (the
server drains, then closes it), exits when the server's end of the pipe closes, and is killed by the
kernel if the server dies (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplex.server.engine import StepOutput

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 3600.0  # loading (and downloading) the models
ANSWER_TIMEOUT_S = 120.0  # one call (a step, a reset); the first CUDA step may compile kernels
CLOSE_TIMEOUT_S = 10.0


class EngineProcessDied(RuntimeError):
    """The model process exited or stopped answering: no step can run any more."""


class EngineStartError(RuntimeError):
    """The model process could not load the models (the message is the user-facing reason)."""


@dataclass(frozen=True)
class EngineSpec:
    """How the child builds its models and engine (picklable: simple values only)."""

    batch_size: int
    model_args: dict[str, Any] = field(default_factory=dict)  # the `duplex serve` model flags (load_models)
    demo: bool = False  # build_demo_models() instead
    min_rows: int | None = None
    torch_threads: int | None = None
    log_level: str = "INFO"

    @staticmethod
    def model_flags(args) -> dict[str, Any]:
        """The picklable attributes of an argparse namespace (load_models reads the model flags among them)."""
        import pickle

        def picklable(value) -> bool:
            try:
                pickle.dumps(value)
                return True
            except Exception:  # noqa: BLE001 - e.g. a lambda a subcommand stored in the namespace
                return False

        return {name: value for name, value in vars(args).items() if picklable(value)}


class PieceTable:
    """The tokenizer's visible text per token id (``piece`` as the real tokenizer answers it)."""

    def __init__(self, pieces: list[str | None]) -> None:
        self.pieces = pieces
        self.vocab_size = len(pieces)

    def piece(self, token: int) -> str | None:
        token = int(token)
        return self.pieces[token] if 0 <= token < self.vocab_size else None


@dataclass
class RemoteModels:
    """What the server needs of the model bundle that lives in the child (no weights)."""

    model_name: str
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    lm_gen_defaults: dict[str, Any]
    tokenizer: PieceTable
    adapter_names: list[str]
    config: dict[str, Any]
    frame_size: int
    lm: None = None  # the weights are in the engine process
    mimi: None = None

    @classmethod
    def of(cls, models) -> RemoteModels:
        from duplex.model.lora_cli import adapter_names

        tokenizer = models.tokenizer
        return cls(model_name=str(models.model_name), device=models.device, dtype=models.dtype,
                   lm_gen_defaults=dict(models.lm_gen_defaults),
                   tokenizer=PieceTable([tokenizer.piece(i) for i in range(tokenizer.vocab_size)]),
                   adapter_names=adapter_names(models.lm), config=dict(models.config or {}),
                   frame_size=int(models.frame_size))


# ---------------------------------------------------------------------------------------------- the server side
class ProcessEngine:
    """The engine interface, served by a child process (see the module docstring)."""

    def __init__(self, spec: EngineSpec, start_timeout_s: float = START_TIMEOUT_S,
                 answer_timeout_s: float = ANSWER_TIMEOUT_S) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded server; CUDA-safe
        self._conn, child_end = context.Pipe()
        self.process = context.Process(target=serve_engine, args=(child_end, spec, os.getpid()),
                                       name="duplex-engine", daemon=False)
        self.process.start()
        child_end.close()
        self.answer_timeout_s = answer_timeout_s
        self._lock = threading.Lock()
        self._dead: str | None = None
        atexit.register(self.close)  # before multiprocessing's own exit handler joins the child
        tag, value = self._receive(start_timeout_s, "load the models")
        if tag == "failed":
            self.close()
            raise EngineStartError(value)
        self.models: RemoteModels = value
        self.batch_size = spec.batch_size
        self.frame_size = value.frame_size
        logger.info("model engine in process %d (%s, %d slots)", self.process.pid, value.model_name,
                    self.batch_size)

    # ------------------------------------------------------------------ the engine interface
    def join(self, slot: int, request=None) -> None:
        self._call("join", slot, request)

    def leave(self, slot: int) -> None:
        self._call("leave", slot)

    def move_slot(self, src: int, dst: int) -> None:
        self._call("move_slot", src, dst)

    def reset_all(self) -> None:
        self._call("reset_all")

    def step(self, pcm: np.ndarray, ready: np.ndarray | None = None) -> StepOutput:
        """``pcm`` [B, 1920] float32, ``ready`` [B] bool: only the rows up to the last ready slot travel."""
        ready = np.ones(self.batch_size, dtype=bool) if ready is None else np.asarray(ready, dtype=bool)
        used = int(np.flatnonzero(ready).max()) + 1 if ready.any() else 0
        pcm = np.ascontiguousarray(np.asarray(pcm, dtype=np.float32).reshape(-1, self.frame_size)[:used])
        output = self._call("step", pcm, ready)
        return _padded(output, self.batch_size)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Ask the child to exit (killed after CLOSE_TIMEOUT_S); idempotent."""
        atexit.unregister(self.close)
        with self._lock:
            if self.process.exitcode is None and self._dead is None:
                try:
                    self._conn.send(("close", ()))
                except OSError:
                    pass
            self._dead = self._dead or "closed"
            self._conn.close()
        self.process.join(CLOSE_TIMEOUT_S)
        if self.process.exitcode is None:
            logger.warning("the model process did not exit in %.0f s: killing it", CLOSE_TIMEOUT_S)
            self.process.kill()
            self.process.join(CLOSE_TIMEOUT_S)

    def _call(self, name: str, *args):
        with self._lock:
            if self._dead is not None:
                raise EngineProcessDied(f"the model process is gone ({self._dead})")
            try:
                self._conn.send((name, args))
            except OSError as exc:
                self.process.join(1.0)
                raise self._died(f"{self._exit_description()} ({exc})") from exc
            tag, value = self._receive(self.answer_timeout_s, name)
        if tag == "error":
            raise value
        return value

    def _receive(self, timeout_s: float, doing: str):
        deadline = time.monotonic() + timeout_s
        try:
            while not self._conn.poll(0.5):
                if self.process.exitcode is not None:
                    raise self._died(self._exit_description())
                if time.monotonic() > deadline:
                    self.process.kill()
                    raise self._died(f"no answer to {doing} within {timeout_s:.0f} s: killed")
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            self.process.join(1.0)
            raise self._died(self._exit_description()) from exc

    def _died(self, why: str) -> EngineProcessDied:
        self._dead = why
        logger.error("the model process failed: %s", why)
        return EngineProcessDied(f"the model process failed: {why}")

    def _exit_description(self) -> str:
        code = self.process.exitcode
        if code is None:
            return "it closed its pipe"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


def _padded(output: StepOutput, batch_size: int) -> StepOutput:
    """The child sends the rows up to its last slot with output: fill the rest (no output) back in."""
    have = output.has_output.shape[0]
    if have == batch_size:
        return output
    pcm = np.zeros((batch_size, output.pcm.shape[1]), dtype=np.float32)  # [B, 1920]
    tokens = np.full((batch_size, output.tokens.shape[1]), -1, dtype=np.int64)  # [B, 1 + dep_q]
    has_output = np.zeros(batch_size, dtype=bool)  # [B]
    pcm[:have], tokens[:have], has_output[:have] = output.pcm, output.tokens, output.has_output
    return StepOutput(pcm=pcm, tokens=tokens, has_output=has_output, timings=output.timings, rows=output.rows)


# ---------------------------------------------------------------------------------------------- the child
def serve_engine(conn, spec: EngineSpec, parent_pid: int) -> None:
    """The child's main: build the engine, then answer calls until told to close or the server is gone."""
    _stay_with_parent(parent_pid)
    logging.basicConfig(level=spec.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [engine]: %(message)s")
    try:
        models, engine = build_engine(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the server as the reason it cannot start
        logger.debug("building the engine failed", exc_info=True)
        conn.send(("failed", _start_failure(exc)))
        return
    conn.send(("ready", RemoteModels.of(models)))
    _answer_calls(conn, engine)


def _answer_calls(conn, engine) -> None:
    buffer = np.zeros((engine.batch_size, engine.frame_size), dtype=np.float32)  # [B, 1920]
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            return  # the server is gone
        if name == "close":
            return
        try:
            if name == "step":
                result = _step(engine, buffer, *args)
            elif name in ("join", "leave", "move_slot", "reset_all"):
                result = getattr(engine, name)(*args)
            else:
                raise ValueError(f"unknown engine call {name!r}")
        except Exception as exc:  # noqa: BLE001 - raised again in the server (the scheduler handles it)
            logger.debug("engine call %s failed", name, exc_info=True)
            conn.send(("error", _portable(exc)))
            continue
        conn.send(("ok", result))


def _step(engine, buffer: np.ndarray, pcm: np.ndarray, ready: np.ndarray) -> StepOutput:
    buffer[: pcm.shape[0]] = pcm
    output = engine.step(buffer, ready)
    used = int(np.flatnonzero(output.has_output).max()) + 1 if output.has_output.any() else 0
    return StepOutput(pcm=output.pcm[:used], tokens=output.tokens[:used], has_output=output.has_output[:used],
                      timings=output.timings, rows=output.rows)


def build_engine(spec: EngineSpec):
    """(models, DuplexEngine) as the spec says, in this process: the child's work, and --no-engine-process's."""
    import argparse

    import torch

    from duplex.server.engine import DuplexEngine

    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    if spec.demo:
        from duplex.server.demo import build_demo_models

        models = build_demo_models()
    else:
        from duplex.bundle_args import load_models

        models = load_models(argparse.Namespace(**spec.model_args))
    from duplex.model.quant_cli import log_kv_capacity

    log_kv_capacity(models.lm, models.device)
    engine = DuplexEngine(models.mimi, models.lm, spec.batch_size, dict(models.lm_gen_defaults),
                          device=models.device, min_rows=spec.min_rows)
    return models, engine


def _start_failure(exc: BaseException) -> str:
    from duplex.sources import ModelSourceError

    if isinstance(exc, ModelSourceError):
        return str(exc)
    return f"loading the models failed: {type(exc).__name__}: {exc}"


def _portable(exc: Exception) -> Exception:
    """The exception itself when it survives pickling, else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _stay_with_parent(parent_pid: int) -> None:
    """Ignore the terminal's and the supervisor's signals (the server drains, then closes us) and die with
    the server (Linux: the kernel sends SIGKILL when it exits)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe still ends us
    if os.getppid() != parent_pid:  # the server died before the prctl
        os._exit(1)
