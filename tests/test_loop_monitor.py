"""The event-loop lag monitor: records how late a timer ran, keeps the worst of the window, warns once."""

from __future__ import annotations

import asyncio
import logging
import time

from duplex.server.loop_monitor import WINDOW_SECONDS, LoopLagMonitor
from duplex.server.metrics import ServerMetrics


def monitor() -> tuple[LoopLagMonitor, ServerMetrics]:
    metrics = ServerMetrics()
    return LoopLagMonitor(metrics.loop_lag, metrics.loop_lag_max), metrics


def test_the_worst_lag_of_the_window_is_kept_and_expires(caplog):
    lags, metrics = monitor()
    with caplog.at_level(logging.WARNING, logger="duplex.server.loop_monitor"):
        lags.record(0.01, now=0.0)
        lags.record(0.30, now=1.0)
        lags.record(0.02, now=2.0)
        assert lags.worst() == 0.30 and metrics.loop_lag_max._value.get() == 0.30
        lags.record(0.40, now=3.0)  # a second long lag within the window: not logged again
        lags.record(0.05, now=3.0 + WINDOW_SECONDS + 0.5)  # 0.30 and 0.40 have left the window
    assert lags.worst() == 0.05
    assert metrics.registry.get_sample_value("duplex_event_loop_lag_seconds_count") == 5
    assert [r.message for r in caplog.records] == [
        "the event loop was blocked for 300 ms: every session's audio stalled that long"]


def test_a_blocked_loop_is_measured():
    lags, metrics = monitor()

    async def main() -> None:
        lags.start()
        await asyncio.sleep(0.1)
        time.sleep(0.2)  # hog the loop
        await asyncio.sleep(0.1)
        await lags.stop()

    asyncio.run(main())
    assert 0.15 <= lags.worst() <= 1.0
    assert metrics.registry.get_sample_value("duplex_event_loop_lag_seconds_bucket", {"le": "0.1"}) >= 3
