"""A summary of how much more one server can take, for readiness probes and load balancers.

``capacity(service)`` reads the scheduler and the admission of a DuplexService (any object with
``scheduler``, ``admission`` and ``shutting_down``); the result's ``as_dict()`` is JSON-ready.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Capacity:
    slots: int  # batch slots (--max-sessions)
    active: int  # slots bound to a session
    queued: int  # clients waiting for a slot
    max_lag_s: float  # the session furthest behind real time (0 = all on time)
    real_time_factor: float  # one step's compute / 80 ms (> 1: cannot hold real time)
    accepting: bool  # a new client would start now (a free slot, nobody queued, lag within --max-lag-ms)

    @property
    def free(self) -> int:
        return max(0, self.slots - self.active)

    def as_dict(self) -> dict:
        return {**asdict(self), "free": self.free}


def capacity(service) -> Capacity:
    """The service's capacity now (call on the event loop thread)."""
    scheduler, admission = service.scheduler, service.admission
    lag = max(scheduler.lags(), default=0.0)
    accepting = (not service.shutting_down and not admission.closed and scheduler.accepting()
                 and admission.active < admission.max_sessions and admission.queue_length == 0)
    return Capacity(slots=scheduler.batch_size, active=admission.active, queued=admission.queue_length,
                    max_lag_s=round(lag, 4), real_time_factor=round(scheduler.real_time_factor, 4),
                    accepting=accepting)
