import itertools

import numpy as np
import pytest
import torch

from ncf.threads import ThreadGovernor


class FakeSteps:
    """Drives a governor with a fake clock: each step costs cost[threads] seconds."""

    def __init__(self, governor: ThreadGovernor, cost: dict[int, float]):
        self.now, self.cost, self.gov = 0.0, cost, governor
        governor.clock = lambda: self.now

    def run(self, steps: int) -> list[int]:
        used = []
        with self.gov:
            for _ in range(steps):
                used.append(torch.get_num_threads())
                self.now += self.cost[torch.get_num_threads()]
                self.gov.step_done()
        return used


def windows(gov: ThreadGovernor) -> list[int]:
    return [threads for threads, _ in gov.history]


def test_governor_tries_each_count_then_keeps_the_fastest():
    before = torch.get_num_threads()
    gov = ThreadGovernor([1, 2], window=4, recheck=100, max_recheck=100)
    used = FakeSteps(gov, {1: 1.0, 2: 0.8}).run(40)
    assert used[:2] == [1, 2]  # trials last a quarter window: one step each here
    assert used[2:] == [2] * 38
    assert windows(gov) == [1, 2] + [2] * 9
    assert gov.seconds_per_step == pytest.approx({1: 1.0, 2: 0.8})
    assert torch.get_num_threads() == before  # restored on exit


def test_governor_leaves_a_count_that_slows_down_and_rechecks_later():
    gov = ThreadGovernor([1, 2], window=4, recheck=5, max_recheck=5)
    fake = FakeSteps(gov, {1: 1.0, 2: 0.8})
    fake.run(12)
    assert windows(gov) == [1, 2, 2, 2] and gov.current == 2
    fake.cost[2] = 3.7  # the other core got busy: 2 threads now 3.7x slower than 1
    fake.run(16)
    # the slow window of 2 starts a trial of 1 thread, which wins
    assert windows(gov)[4:6] == [2, 1] and set(windows(gov)[6:]) == {1} and gov.current == 1
    fake.cost[2] = 0.8  # idle again: found at the periodic re-check (every 5 windows here)
    before = len(gov.history)
    fake.run(80)
    after = windows(gov)[before:]
    back = after.index(2)
    assert back <= 5
    # from then on 2 threads (the trial window, then 5 more), but for one trial of 1 thread
    # after every 5 windows of 2
    assert after[back:] == [1 if k and k % 6 == 0 else 2 for k in range(len(after) - back)]
    assert after[back:].count(1) == 3


def test_one_choice_never_switches():
    gov = ThreadGovernor([3], window=2)
    used = FakeSteps(gov, {3: 1.0}).run(10)
    assert used == [3] * 10 and gov.history == []


def test_thread_count_does_not_change_training_results():
    """What lets the governor switch freely: the same stage trained with 1 and with 2 torch
    threads gives bit-identical weights and history (CPU)."""
    from ncf.data import index_interactions
    from ncf.models import ModelConfig, NeuMF
    from ncf.pipeline import build_eval_sets
    from ncf.split import leave_one_out
    from ncf.synthetic import synthetic_interactions
    from ncf.train import EpochData, StageConfig, train_stage

    inter = index_interactions(synthetic_interactions(n_users=300, n_items=200, seed=3)
                               .rename({"user_id": "user", "item_id": "item", "timestamp": "ts"}))
    split = leave_one_out(inter, seed=0)
    val, _ = build_eval_sets(inter, split, seed=0)
    results = []
    for threads in (1, 2):
        torch.manual_seed(0)
        model = NeuMF(ModelConfig("neumf", inter.n_users, inter.n_items))
        data = EpochData(split.train_users, split.train_items, inter.n_items, torch.device("cpu"))
        cfg = StageConfig("t", epochs=2, batch_size=512, lr=4e-3, warmup=True, thread_choices=(threads,))
        results.append(train_stage(model, data, val, cfg))
    a, b = results
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    strip = [{k: v for k, v in h.items() if "seconds" not in k and k != "samples_per_s"} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if "seconds" not in k and k != "samples_per_s"} for h in b.history]
    assert np.array_equal(a.val_ranks, b.val_ranks)


def test_recheck_interval_doubles_while_trials_confirm_the_choice():
    gov = ThreadGovernor([1, 2], window=1, recheck=2, max_recheck=8)
    FakeSteps(gov, {1: 1.0, 2: 3.0}).run(60)
    trials_of_2 = [w for w, t in enumerate(windows(gov)) if t == 2]
    gaps = [b - a - 1 for a, b in itertools.pairwise(trials_of_2)]  # windows of 1 in between
    # after the first round, 2 windows of 1 thread before the next trial of 2, then 4, 8, 8 ...
    assert trials_of_2[0] == 1
    assert gaps[:5] == [2, 4, 8, 8, 8]


def test_windows_span_epochs_without_the_time_between_them():
    """Short epochs (fewer steps than a window) still complete windows: the governor's clock
    pauses between epochs (validation there must not count as step time)."""
    gov = ThreadGovernor([1, 2], window=8, recheck=100, max_recheck=100)
    fake = FakeSteps(gov, {1: 1.0, 2: 0.5})
    for _ in range(10):  # 10 "epochs" of 3 steps, 100 s of "validation" between them
        fake.run(3)
        fake.now += 100.0
    assert windows(gov)[:2] == [1, 2]  # the two trials (2 steps each), across epochs
    assert gov.seconds_per_step == pytest.approx({1: 1.0, 2: 0.5})
    assert len(gov.history) >= 4


def test_training_threads_choices():
    from ncf.cpus import cpu_count
    from ncf.pipeline import training_threads

    cpu = torch.device("cpu")
    assert training_threads(3, cpu) == (3,)
    assert training_threads(None, torch.device("cuda")) == (1,)
    assert training_threads(None, cpu) == ((1, 2) if cpu_count() >= 2 else (1,))
