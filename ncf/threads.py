"""How many intra-op threads a training step gets, chosen by timing the steps themselves.

On this project's 2-core VM a second torch thread made a step (batch 2048) about 20% faster
while the other core was idle, and 3.7x slower while another process kept it busy: OpenMP
makes every operator wait for a worker that is not running (tests/benchmarks/bench_train.py,
README). Neither fixed setting is safe on a shared machine, so the governor measures: steps
run in windows; the first windows try each thread count, later ones use the fastest, and a
window markedly slower than that count's previous one starts a new round of trials, as does
the passing of `recheck` windows; that interval doubles (up to `max_recheck`) while trials
keep confirming the choice, and trials last a quarter window, so a count that lost stays
cheap to re-check and a count that loses only for a while (the other core busy with the
next epoch's draw) is found again soon. The thread count does not change the results: the
same seed gives bit-identical weights with 1 or 2 threads (tests/test_threads.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


class ThreadGovernor:
    def __init__(
        self,
        choices: Sequence[int],
        window: int = 32,
        recheck: int = 4,
        max_recheck: int = 64,
        slowdown: float = 1.3,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.choices = sorted({max(1, int(c)) for c in choices}) or [1]
        self.window, self.slowdown = window, slowdown
        self.trial_window = max(1, window // 4)
        self.min_recheck, self.max_recheck = recheck, max_recheck
        self.recheck = recheck  # windows between rounds of trials (grows while they agree)
        self.clock = clock
        self.seconds_per_step: dict[int, float] = {}  # each count's latest measured window
        self.current = self.choices[0]
        self._to_try = self.choices[1:]  # counts still to time in this round of trials
        self._trying = True
        self._before_trials: int | None = None
        self._since_trials = 0
        self._steps = 0  # steps of the window so far (windows span epochs)
        self._elapsed = 0.0  # their time, without the time between epochs
        self._start = 0.0
        self._saved = 1
        self.history: list[tuple[int, float]] = []  # (threads, seconds per step) per window

    def __enter__(self) -> ThreadGovernor:  # noqa: PYI034 (Self needs Python 3.11)
        self._saved = torch.get_num_threads()
        torch.set_num_threads(self.current)
        self._start = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        self._elapsed += self.clock() - self._start  # the window goes on in the next epoch
        torch.set_num_threads(self._saved)

    def step_done(self) -> None:
        if len(self.choices) == 1:
            return
        self._steps += 1
        # a trial is short: a losing count (3.7x slower with a busy core) costs little
        if self._steps < (self.trial_window if self._trying else self.window):
            return
        now = self.clock()
        self._decide((self._elapsed + now - self._start) / self._steps)
        torch.set_num_threads(self.current)
        self._steps, self._elapsed, self._start = 0, 0.0, self.clock()

    def _decide(self, per_step: float) -> None:
        self.history.append((self.current, per_step))
        previous = self.seconds_per_step.get(self.current)
        self.seconds_per_step[self.current] = per_step
        if self._trying:
            if self._to_try:
                self.current = self._to_try.pop(0)
                return
            self._trying, self._since_trials = False, 0
            chosen = min(self.choices, key=lambda c: self.seconds_per_step[c])
            kept = chosen == self._before_trials
            self.recheck = min(2 * self.recheck, self.max_recheck) if kept else self.min_recheck
            self.current = chosen
            return
        self._since_trials += 1
        slowed = previous is not None and per_step > self.slowdown * previous
        if slowed or self._since_trials >= self.recheck:
            # this window is the current count's trial; time the others next
            self._trying, self._before_trials = True, self.current
            self._to_try = [c for c in self.choices if c != self.current]
            self.current = self._to_try.pop(0)
