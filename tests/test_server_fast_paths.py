"""The event-loop fast paths of a session (issue 13, item 3: the canary's audio under a flood).

While the loop is busy, every extra iteration a frame waits costs tens of milliseconds. A real-time
client's audio is therefore decoded and pushed by the reader itself when nothing waits before it, and
an output message is written from the callback that made it when the sender is idle. Both fall back to
the queued path, in order, whenever something waits.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import sphn
from server_harness import FRAME, load_tiny_models, synth_audio
from test_server_session import ScriptedWebSocket

from duplex.server import protocol
from duplex.server.service import DuplexService, ServerSettings
from duplex.server.session import Session
from duplex.server.session.eager import start_eagerly


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


# ------------------------------------------------------------------------------------- start_eagerly
def test_a_coroutine_that_does_not_wait_finishes_before_start_eagerly_returns():
    async def main():
        done = []

        async def work():
            done.append(1)

        assert start_eagerly(work()) is None and done == [1]

        async def fails():
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            start_eagerly(fails())

    asyncio.run(main())


def test_a_coroutine_that_waits_goes_on_in_a_task_with_its_result_and_errors():
    async def main():
        loop = asyncio.get_running_loop()
        gate, steps = loop.create_future(), []

        async def work():
            steps.append("start")
            value = await gate
            await asyncio.sleep(0)  # a bare yield too
            steps.append(value)
            return value * 2

        task = start_eagerly(work())
        assert steps == ["start"] and not task.done()
        gate.set_result(21)
        assert await task == 42 and steps == ["start", 21]

        failing = loop.create_future()

        async def waits_then_fails():
            await failing

        task = start_eagerly(waits_then_fails())
        failing.set_exception(OSError("gone"))
        with pytest.raises(OSError, match="gone"):
            await task

    asyncio.run(main())


def test_cancelling_the_task_ends_the_coroutine_as_a_task_would():
    async def main():
        seen = []

        async def work():
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            finally:
                seen.append("finally")

        task = start_eagerly(work())
        task.cancel()  # before the task's first step: the coroutine is closed (its finally runs)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["finally"]
        seen.clear()
        task = start_eagerly(work())
        await asyncio.sleep(0)  # the task now waits on the coroutine's own future
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled", "finally"]

    asyncio.run(main())


# ------------------------------------------------------------------------------------- output
class GatedWebSocket(ScriptedWebSocket):
    """Sends go through at once, except while ``hold`` is clear (the transport is not writable)."""

    def __init__(self) -> None:
        super().__init__(frames=0, reads_after=10**9)
        self.hold = asyncio.Event()
        self.hold.set()

    async def send_bytes(self, data: bytes) -> None:
        await self.hold.wait()
        self.sent.append(data)


async def session_sending(models, ws) -> tuple[Session, asyncio.Future, list]:
    """A session on ``ws`` with its sender running (and idle); the list fills when it reports the client gone."""
    session = Session(ws, DuplexService(models, ServerSettings(max_sessions=1)))
    gone: list = []
    sender = asyncio.ensure_future(session.outbound.send_loop(lambda: gone.append(True)))
    await asyncio.sleep(0)
    assert session.outbound.on_gone is not None
    return session, sender, gone


def test_output_is_written_from_the_callback_that_made_it_when_the_sender_is_idle(models):
    async def main():
        ws = GatedWebSocket()
        session, sender, _ = await session_sending(models, ws)
        out = session.outbound
        page = protocol.encode_audio(b"OggS page")
        out.enqueue(page, [0.0], frames=1)
        assert ws.sent == [page]  # on the wire before enqueue returned: no loop iteration in between
        assert out.queued == 0 and out.audio_queued == 0 and out.frames_unsent == 0
        assert session.record.frames_out == 1 and out.last_audio_sent is not None
        sender.cancel()

    asyncio.run(main())


def test_output_keeps_its_order_when_a_send_has_to_wait(models):
    async def main():
        ws = GatedWebSocket()
        session, sender, _ = await session_sending(models, ws)
        out = session.outbound
        ws.hold.clear()  # not writable: the first send waits, the next ones queue behind it
        messages = [protocol.encode_audio(bytes([i]) * 10) for i in range(5)]
        for message in messages:
            out.enqueue(message, frames=1)
        assert ws.sent == [] and out.sending is not None and out.audio_queued == 4
        await asyncio.sleep(0.01)
        out.enqueue(protocol.encode_text("hi"))  # still behind the others
        ws.hold.set()
        for _ in range(100):
            await asyncio.sleep(0)
        assert ws.sent == [*messages, protocol.encode_text("hi")]
        assert out.queued == 0 and out.audio_queued == 0 and out.frames_unsent == 0 and out.sending is None
        out.enqueue(messages[0])  # idle again: at once
        assert ws.sent[-1] == messages[0]
        await out.flush(sender, flush=True)
        assert sender.done()

    asyncio.run(main())


def test_a_failed_send_at_once_tells_the_session(models):
    async def main():
        ws = ScriptedWebSocket(frames=0, send_error=ConnectionError("gone"))
        session, sender, gone = await session_sending(models, ws)
        session.outbound.enqueue(protocol.encode_audio(b"x"), frames=1)
        assert gone == [True] and session.outbound.frames_unsent == 1  # counted as dropped at the flush
        session.outbound.enqueue(protocol.encode_text("more"))  # the client is gone: not tried again
        assert gone == [True] and session.outbound.queued == 0
        sender.cancel()

    asyncio.run(main())


# ------------------------------------------------------------------------------------- input
class RecordingScheduler:
    """The scheduler's side of a slot: ``space`` frames fit in the inbox; pushes are recorded."""

    def __init__(self, space: int) -> None:
        self.space = space
        self.pushed: list[np.ndarray] = []

    def inbox_space(self, handle) -> int:
        return self.space

    async def push(self, handle, frame, arrived=None) -> None:
        self.pushed.append(frame)


def audio_messages(frames: int) -> list[dict]:
    writer = sphn.OpusStreamWriter(24000)
    audio = synth_audio(frames, 3)
    pages = [writer.append_pcm(audio[i * FRAME:(i + 1) * FRAME]) for i in range(frames)]
    return [{"type": "websocket.receive", "bytes": protocol.encode_audio(p)} for p in pages if p]


def reference_frames(messages: list[dict]) -> np.ndarray:
    reader = sphn.OpusStreamReader(24000)
    pcm = np.concatenate([np.asarray(reader.append_bytes(m["bytes"][1:]), np.float32) for m in messages])
    return pcm[:pcm.size // FRAME * FRAME].reshape(-1, FRAME)


def inbound_with(models, scheduler: RecordingScheduler):
    service = DuplexService(models, ServerSettings(max_sessions=1))
    service.scheduler = scheduler
    session = Session(ScriptedWebSocket(frames=0), service)
    session.handle = object()
    return session.inbound


def test_a_real_time_message_is_pushed_by_the_reader_itself(models):
    async def main():
        scheduler = RecordingScheduler(space=8)
        inbound = inbound_with(models, scheduler)
        messages = audio_messages(12)
        for message in messages:
            await inbound.on_message(message)  # no feeder running: only the fast path can push
        assert inbound.received.empty()
        np.testing.assert_array_equal(np.stack(scheduler.pushed), reference_frames(messages))

    asyncio.run(main())


def test_audio_goes_through_the_buffer_in_order_when_anything_waits(models):
    async def main():
        scheduler = RecordingScheduler(space=0)  # the slot's inbox is full
        inbound = inbound_with(models, scheduler)
        messages = audio_messages(12)
        for message in messages[:4]:
            await inbound.on_message(message)
        assert scheduler.pushed == [] and inbound.received.qsize() == 4
        scheduler.space = 8  # room again, but four messages wait in the buffer: the next ones queue too
        for message in messages[4:8]:
            await inbound.on_message(message)
        assert scheduler.pushed == [] and inbound.received.qsize() == 8
        feeder = asyncio.ensure_future(inbound.feed_loop())
        while not inbound.received.empty() or inbound.feeding:
            await asyncio.sleep(0)
        for message in messages[8:]:  # the feeder is idle and the buffer empty: at once again
            await inbound.on_message(message)
        assert inbound.received.empty()
        np.testing.assert_array_equal(np.stack(scheduler.pushed), reference_frames(messages))
        feeder.cancel()

    asyncio.run(main())


class BlockingScheduler(RecordingScheduler):
    """Its first push waits until ``unblock`` is set (the inbox was full), although room is reported."""

    def __init__(self) -> None:
        super().__init__(space=8)
        self.unblock = asyncio.Event()
        self.waited = False

    async def push(self, handle, frame, arrived=None) -> None:
        if not self.waited:
            self.waited = True
            await self.unblock.wait()
        self.pushed.append(frame)


def test_the_reader_never_overtakes_the_feeder_in_the_middle_of_a_push(models):
    async def main():
        scheduler = BlockingScheduler()
        inbound = inbound_with(models, scheduler)
        messages = audio_messages(12)
        scheduler.space = 0
        await inbound.on_message(messages[0])  # the inbox is full: it waits in the buffer
        scheduler.space = 8
        feeder = asyncio.ensure_future(inbound.feed_loop())
        while not scheduler.waited:  # the feeder took it and is in its push
            await asyncio.sleep(0)
        assert inbound.feeding and inbound.received.empty()
        for message in messages[1:]:  # nothing buffered and room reported, but the feeder is mid-push
            await inbound.on_message(message)
        assert inbound.received.qsize() == len(messages) - 1
        scheduler.unblock.set()
        while not inbound.received.empty() or inbound.feeding:
            await asyncio.sleep(0)
        np.testing.assert_array_equal(np.stack(scheduler.pushed), reference_frames(messages))
        feeder.cancel()

    asyncio.run(main())
