"""The simulator and the issue's targets: 4 pods, 8 models Zipf(1.1), 2000 tasks."""

from __future__ import annotations

import pytest

from dispatcher.scheduler import FifoPolicy
from dispatcher.simulator import (
    SimTask,
    affinity_for,
    compare,
    lower_bound,
    simulate,
    zipf_workload,
)


def test_simulate_is_deterministic():
    tasks = zipf_workload(n_tasks=300, seed=3, arrival_rate=3.0)
    first = simulate(affinity_for(1, 10), tasks, switch_cost=10)
    again = simulate(affinity_for(1, 10), tasks, switch_cost=10)
    assert first == again


def test_simulate_fifo_hand_checked():
    # 1 pod, models a, b, a: FIFO switches every time: 3 loads of 10 + 3 jobs of 1
    tasks = [SimTask("1", "a", 0), SimTask("2", "b", 0), SimTask("3", "a", 0)]
    result = simulate(FifoPolicy(), tasks, pods=1, inference_time=1, switch_cost=10)
    assert result.makespan == 33 and result.switches == 3
    assert result.waits == {"1": 0, "2": 11, "3": 22}
    # affinity does both "a" first: 2 loads
    result = simulate(affinity_for(1, 10), tasks, pods=1, inference_time=1, switch_cost=10)
    assert result.makespan == 23 and result.switches == 2


def test_lower_bound_counts_work_and_loads():
    tasks = [SimTask(str(i), "ab"[i % 2], 0) for i in range(8)]
    assert lower_bound(tasks, pods=2, inference_time=1, switch_cost=10) == (8 + 20) / 2


@pytest.mark.parametrize("switch_cost", [10])
def test_affinity_beats_fifo_on_zipf_burst(switch_cost):
    (row,) = compare(switch_costs=(switch_cost,))
    assert row.ratio >= 3.0
    assert row.makespan_vs_bound <= 1.15
    # bounded wait: nobody waits longer than the whole run, and far less than under FIFO
    assert row.affinity_max_wait <= row.affinity_makespan
    assert row.affinity_max_wait < row.fifo_max_wait


def test_affinity_max_wait_bounds_rare_model_under_steady_stream():
    # GIVEN one pod, a steady stream of "hot" tasks and a single "rare" task early on
    hot = [SimTask(f"h{i}", "hot", float(i)) for i in range(400)]
    tasks = [*hot, SimTask("rare", "rare", 1.5)]
    policy = affinity_for(1, 10, max_wait=50)
    result = simulate(policy, tasks, pods=1, inference_time=1, switch_cost=10)
    # THEN the rare task starts within the bound plus one job and one switch
    assert result.waits["rare"] <= 50 + 1 + 10
    # AND switching cost is paid only for it and back
    assert result.switches <= 3


def test_replicas_with_the_shared_view_schedule_like_one():
    # 4 replicas each holding a quarter of a 16-pod burst: on their own view rare
    # models accumulate 4x slower in each, and freed pods are switched away from
    # models the other replicas still have tasks of
    tasks = zipf_workload(n_tasks=3000, n_models=32, exponent=1.1, seed=1)
    common = {"pods": 16, "inference_time": 1, "switch_cost": 10, "window": 1024}
    bound = lower_bound(tasks, 16, 1, 10)
    alone = simulate(affinity_for(1, 10), tasks, replicas=4, shared_view=False, **common)
    shared = simulate(affinity_for(1, 10), tasks, replicas=4, **common)
    one = simulate(affinity_for(1, 10), tasks, replicas=1, **common)
    assert shared.n_tasks == alone.n_tasks == 3000
    assert shared.makespan < alone.makespan
    assert shared.switches < alone.switches
    assert shared.makespan / bound <= max(1.15, one.makespan / bound)
    # a view one poll old still schedules every task and is deterministic
    stale = simulate(affinity_for(1, 10), tasks, replicas=4, view_interval=0.5, **common)
    assert stale.n_tasks == 3000
    assert stale == simulate(affinity_for(1, 10), tasks, replicas=4, view_interval=0.5, **common)
