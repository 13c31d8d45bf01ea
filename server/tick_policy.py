"""The scheduler's tick policy: which slots step now, decided from the slots' queues and a clock.

Pure and deterministic (no threads, no engine, no wall clock of its own): the worker asks
:meth:`TickPolicy.decide` with the current time and one :class:`SlotView` per bound slot, and
either steps the slots it names or waits at most the time it says. The rules (README, "Timing"):

- Only slots with a queued frame step; each consumes exactly one frame. A slot without a frame is
  not stepped (no silence is ever stepped for it) and produces nothing: a client that stops
  sending pauses its own conversation.
- Catch-up: when a ready slot is behind (more than one frame queued, or its oldest frame waited a
  whole frame period) the step runs at once, so a backlog is worked off in back-to-back steps.
- Coalescing: otherwise the step may wait for other running slots whose next frame is due soon,
  but never longer than ``window`` after the oldest ready frame arrived (one step's compute,
  estimated from recent steps). A frame therefore waits at most one step's compute before its
  step starts: either the step running when it arrived, or the coalescing window.
- Catch-up yields: steps run only for slots that are behind use at most ``catch_up_share`` of the
  time (after such a step of d seconds, the next one waits d * (1 / share - 1)), so that working off a
  backlog leaves the CPU and the interpreter to the sockets and Opus of everyone else. An on-time
  slot's frame never waits for that rest: it steps by the coalescing rule (with the behind slots).
- Catch-up makes way: a step for behind slots alone does not start when a running slot's next frame
  is due before that step would end (one step's compute from now); it waits for that frame (at most
  one window past its due time, then the frame counts as late) and both step together. Otherwise an
  on-time frame that arrives just after a catch-up step started would wait for that whole step. It
  makes way only while such a step ran in the last frame period: a backlog always gets one step of its
  own per period besides the shared ones, so it is worked off even when steps are too long (over half
  a period) for one to fit between on-time frames; then on-time frames wait as without this rule.
"""

from __future__ import annotations

from dataclasses import dataclass

PAUSED_AFTER_FRAMES = 2.0  # a slot silent for this many frame periods is not waited for


@dataclass(frozen=True)
class SlotView:
    """What the policy sees of one bound slot."""

    slot: int
    queued: int  # frames waiting to be stepped
    oldest_arrival: float | None = None  # arrival of the oldest queued frame
    last_arrival: float | None = None  # arrival of the newest frame received (queued or stepped)


@dataclass(frozen=True)
class TickDecision:
    """Step ``ready`` now, or (``ready`` empty) wait at most ``wait_s`` (None: until a frame arrives)."""

    ready: tuple[int, ...] = ()
    wait_s: float | None = None
    catch_up: bool = False  # stepped at once because a ready slot is behind


class TickPolicy:
    """Decides ticks; keeps a running estimate of one step's compute."""

    def __init__(self, frame_seconds: float = 0.08, initial_step_s: float = 0.0, smoothing: float = 0.2,
                 catch_up_share: float = 1.0) -> None:
        if not 0.0 < catch_up_share <= 1.0:
            raise ValueError(f"catch_up_share must be in (0, 1], got {catch_up_share}")
        self.frame_seconds = frame_seconds
        self.step_estimate = initial_step_s
        self.smoothing = smoothing
        self.catch_up_share = catch_up_share
        self.catch_up_not_before = float("-inf")  # the next step for behind slots only may start then
        self.last_solo_catch_up = float("-inf")  # when the last step for behind slots alone was decided
        self._observed = False

    def observe_step(self, seconds: float, end: float | None = None, catch_up: bool = False) -> None:
        """Record the compute time of a step just run (exponential moving average); ``end``: when it
        finished (on the policy's clock), ``catch_up``: whether it was a catch-up step."""
        if not self._observed:
            self.step_estimate, self._observed = seconds, True
        else:
            self.step_estimate += self.smoothing * (seconds - self.step_estimate)
        if catch_up and end is not None:
            self.catch_up_not_before = end + seconds * (1.0 / self.catch_up_share - 1.0)

    @property
    def window(self) -> float:
        """The longest a ready frame waits for others: one step's compute (at most a frame period)."""
        return min(self.step_estimate, self.frame_seconds)

    def decide(self, now: float, slots: list[SlotView]) -> TickDecision:
        ready = [v for v in slots if v.queued > 0]
        if not ready:
            return TickDecision()
        step_now = TickDecision(ready=tuple(v.slot for v in ready))
        on_time = [v for v in ready if not self._behind(now, v)]
        if len(on_time) < len(ready):  # someone is behind
            if not on_time:  # only backlog to work off: rest first, and make way for frames due meanwhile
                resume = self.catch_up_not_before
                if now - self.last_solo_catch_up < self.frame_seconds:  # it had a step of its own lately
                    resume = max(resume, self._make_way_until(now, slots))
                if now < resume:
                    return TickDecision(wait_s=resume - now)
                self.last_solo_catch_up = now
                return TickDecision(ready=step_now.ready, catch_up=True)
            if now >= self.catch_up_not_before:
                return TickDecision(ready=step_now.ready, catch_up=True)
        deadline = min(v.oldest_arrival if v.oldest_arrival is not None else now for v in on_time) + self.window
        if now >= deadline or not any(self._due_before(now, v, deadline) for v in slots if v.queued == 0):
            return step_now
        return TickDecision(wait_s=deadline - now)

    def _behind(self, now: float, view: SlotView) -> bool:
        return view.queued > 1 or (view.oldest_arrival is not None
                                   and now - view.oldest_arrival >= self.frame_seconds)

    def _make_way_until(self, now: float, slots: list[SlotView]) -> float:
        """Until when a step for behind slots alone must wait: the latest give-up time (due + window) of
        the running slots whose next frame is due before such a step, started now, would end."""
        until = float("-inf")
        for view in slots:
            if view.queued == 0 and self._running(now, view):
                due = view.last_arrival + self.frame_seconds
                if due <= now + self.step_estimate and now < due + self.window:
                    until = max(until, due + self.window)
        return until

    def _running(self, now: float, view: SlotView) -> bool:
        """The slot sent a frame recently (it is not paused)."""
        return view.last_arrival is not None and now - view.last_arrival <= PAUSED_AFTER_FRAMES * self.frame_seconds

    def _due_before(self, now: float, view: SlotView, deadline: float) -> bool:
        """A running slot (not paused) whose next frame is due by ``deadline``: worth waiting for."""
        return self._running(now, view) and view.last_arrival + self.frame_seconds <= deadline
