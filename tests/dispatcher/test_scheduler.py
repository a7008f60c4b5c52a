"""The pure policies: affinity, switching, the max-wait bound, fairness, fail fast."""

from __future__ import annotations

from dispatcher.scheduler import (
    AffinityPolicy,
    Assign,
    CostModel,
    FifoPolicy,
    PendingTask,
    PodView,
    Prefetch,
    Reject,
)

COSTS = CostModel(inference=1.0, ram=3.0, disk=10.0, remote=30.0)


def tasks(*specs: tuple[str, float]) -> list[PendingTask]:
    return [PendingTask(f"t{i}", model, at) for i, (model, at) in enumerate(specs)]


def assigned(plan) -> dict[str, str]:
    return {d.task: d.pod for d in plan.decisions if isinstance(d, Assign)}


def test_affinity_prefers_pod_holding_model_on_gpu():
    # GIVEN two free pods, one holding "b" on its GPU
    pods = [
        PodView("p1", 1, "a", gpu=frozenset({"a"})),
        PodView("p2", 1, "b", gpu=frozenset({"b"})),
    ]
    # WHEN the oldest task wants "b"
    plan = AffinityPolicy(costs=COSTS).plan(10.0, tasks(("b", 0.0)), pods)
    # THEN it goes to the pod that has it, without a switch
    assert plan.assignments == [Assign("t0", "p2", "b", switch=False)]


def test_affinity_prefers_ram_then_disk_when_switching():
    pods = [
        PodView("disk", 1, None, disk=frozenset({"m"})),
        PodView("ram", 1, None, ram=frozenset({"m"})),
        PodView("none", 1, None),
    ]
    plan = AffinityPolicy(costs=COSTS).plan(0.0, tasks(("m", 0.0)), pods)
    assert assigned(plan) == {"t0": "ram"}


def test_affinity_keeps_pod_on_its_model_while_it_has_backlog():
    # GIVEN a pod on "a" with "a" tasks waiting, and an older "b" task, not yet overdue
    pods = [PodView("p1", 1, "a", gpu=frozenset({"a"}))]
    waiting = tasks(("b", 0.0), ("a", 1.0), ("a", 2.0))
    plan = AffinityPolicy(costs=COSTS, max_wait=100).plan(5.0, waiting, pods)
    # THEN it stays on "a" (FIFO would switch to "b")
    assert assigned(plan) == {"t1": "p1"}
    assert assigned(FifoPolicy().plan(5.0, waiting, pods)) == {"t0": "p1"}
    # AND it asks to be woken no later than when "b" becomes overdue
    assert plan.wake_at is not None and plan.wake_at <= 100.0


def test_affinity_switches_when_own_model_has_no_backlog():
    pods = [PodView("p1", 1, "a", gpu=frozenset({"a"}))]
    plan = AffinityPolicy(costs=COSTS).plan(1.0, tasks(("b", 0.0)), pods)
    assert plan.assignments == [Assign("t0", "p1", "b", switch=True)]


def test_affinity_does_not_pile_onto_model_already_served_when_switch_costs_more():
    # GIVEN p1 busy on "a" with 2 "a" tasks left; p2 idle on "z" with nothing of "z"
    pods = [
        PodView("p1", 0, "a", gpu=frozenset({"a"})),
        PodView("p2", 1, "z", gpu=frozenset({"z"})),
    ]
    plan = AffinityPolicy(costs=COSTS).plan(0.0, tasks(("a", 0.0), ("a", 0.0)), pods)
    # THEN p2 does not load "a" from the bucket (30 s) to save 2 jobs of 1 s
    assert plan.assignments == []
    # BUT with a large backlog it helps
    many = tasks(*[("a", 0.0)] * 100)
    plan = AffinityPolicy(costs=COSTS).plan(0.0, many, pods)
    assert [d.pod for d in plan.assignments] == ["p2"]


def test_affinity_max_wait_switches_pod_for_starving_model():
    # GIVEN a pod busy streaming "a" tasks and a lone "b" task
    pods = [PodView("p1", 1, "a", gpu=frozenset({"a"}))]
    policy = AffinityPolicy(costs=COSTS, max_wait=60.0)
    stream = [("a", t) for t in (50.0, 55.0, 59.0)]
    # WHEN "b" has waited less than max_wait: affinity keeps "a"
    early = policy.plan(59.0, tasks(("b", 0.0), *stream), pods)
    assert assigned(early) == {"t1": "p1"}
    # WHEN "b" has waited past max_wait (and far longer than the "a" tasks): it is served
    late = policy.plan(61.0, tasks(("b", 0.0), *stream), pods)
    assert late.assignments == [Assign("t0", "p1", "b", switch=True)]


def test_affinity_max_wait_does_not_thrash_between_equally_old_models():
    # GIVEN a burst: everything published at 0, all overdue, 1 pod on "a"
    pods = [PodView("p1", 1, "a", gpu=frozenset({"a"}))]
    plan = AffinityPolicy(costs=COSTS, max_wait=60.0).plan(
        500.0, tasks(("b", 0.0), ("a", 0.0), ("c", 0.0)), pods
    )
    # THEN the pod keeps its model: switching would not help anyone wait less
    assert assigned(plan) == {"t1": "p1"}


def test_affinity_fairness_every_model_gets_a_pod_when_pods_suffice():
    pods = [PodView(f"p{i}", 1, None) for i in range(3)]
    waiting = tasks(*[("a", 0.0)] * 10, ("b", 0.0), ("c", 0.0))
    plan = AffinityPolicy(costs=COSTS).plan(0.0, waiting, pods)
    models = sorted(d.model for d in plan.assignments)
    assert models == ["a", "b", "c"]


def test_affinity_fails_fast_model_no_pod_can_obtain():
    pods = [PodView("p1", 1, "a", available=frozenset({"a", "b"}))]
    plan = AffinityPolicy(costs=COSTS).plan(0.0, tasks(("nope", 0.0), ("b", 0.0)), pods)
    assert [d for d in plan.decisions if isinstance(d, Reject)] == [
        Reject("t0", "nope", "no pod of this runtime can obtain the model")
    ]
    # unknown catalogs: no rejection, the pod decides
    plan = AffinityPolicy(costs=COSTS).plan(0.0, tasks(("nope", 0.0)), [PodView("p1", 1, "a")])
    assert not [d for d in plan.decisions if isinstance(d, Reject)]


def test_affinity_prefetches_next_model_for_pod_running_out_of_work():
    # GIVEN p1 busy on the last "a" job, and "b" waiting for no one
    pods = [PodView("p1", 0, "a", gpu=frozenset({"a"}))]
    plan = AffinityPolicy(costs=COSTS).plan(0.0, tasks(("b", 0.0)), pods)
    assert Prefetch("p1", "b") in plan.decisions
    # not when "b" already sits in its RAM
    pods = [PodView("p1", 0, "a", gpu=frozenset({"a"}), ram=frozenset({"b"}))]
    plan = AffinityPolicy(costs=COSTS).plan(0.0, tasks(("b", 0.0)), pods)
    assert not [d for d in plan.decisions if isinstance(d, Prefetch)]


def test_policies_fill_every_free_slot_and_never_busy_pods():
    pods = [PodView("p1", 2, "a"), PodView("p2", 0, "a")]
    waiting = tasks(*[("a", float(i)) for i in range(5)])
    for policy in (AffinityPolicy(costs=COSTS), FifoPolicy()):
        plan = policy.plan(10.0, waiting, pods)
        assert [d.pod for d in plan.assignments] == ["p1", "p1"]
        assert sorted(d.task for d in plan.assignments) == ["t0", "t1"]


def test_policies_are_deterministic():
    pods = [PodView(f"p{i}", 1, None) for i in range(4)]
    waiting = tasks(*[(m, float(i % 7)) for i, m in enumerate("abcdabcaaab" * 3)])
    for policy in (AffinityPolicy(costs=COSTS), FifoPolicy()):
        assert policy.plan(3.0, waiting, pods) == policy.plan(3.0, list(reversed(waiting)), pods)


def test_affinity_leaves_a_pod_free_for_the_replica_that_has_its_models_tasks():
    # GIVEN p1 free on "a", this replica holding only "b" tasks, another replica 5 "a" tasks
    pods = [PodView("p1", 1, "a", gpu=frozenset({"a"}))]
    waiting = tasks(*[("b", 0.0)] * 40)
    alone = AffinityPolicy(costs=COSTS).plan(1.0, waiting, pods)
    assert assigned(alone) == {"t0": "p1"}  # on its own view it would switch p1 to "b"
    shared = AffinityPolicy(costs=COSTS).plan(1.0, waiting, pods, others={"a": 5})
    # THEN p1 is left on "a" for the other replica to send its tasks to
    assert assigned(shared) == {}


def test_affinity_holds_at_most_one_pod_per_task_other_replicas_have():
    pods = [PodView(f"p{i}", 1, "a", gpu=frozenset({"a"})) for i in range(3)]
    waiting = tasks(*[("b", 0.0)] * 200)  # enough "b" work for every pod
    assert len(assigned(AffinityPolicy(costs=COSTS).plan(1.0, waiting, pods))) == 3
    plan = AffinityPolicy(costs=COSTS).plan(1.0, waiting, pods, others={"a": 1})
    assert len(assigned(plan)) == 2


def test_affinity_counts_other_replicas_tasks_when_a_load_pays_off():
    # GIVEN a free pod on "a" with more "a" work, a second server of "a", and a rare
    # model "r": 2 tasks here do not pay for a 30 s load, 2 + 40 elsewhere do
    pods = [
        PodView("p1", 1, "a", gpu=frozenset({"a"})),
        PodView("p2", 0, "a", gpu=frozenset({"a"})),
    ]
    waiting = tasks(*[("a", 0.0)] * 10, ("r", 0.0), ("r", 0.0))
    alone = AffinityPolicy(costs=COSTS).plan(1.0, waiting, pods)
    assert {d.model for d in alone.assignments} == {"a"}
    shared = AffinityPolicy(costs=COSTS).plan(1.0, waiting, pods, others={"r": 40})
    # THEN p1 opens "r" (the other replica sends its "r" tasks there next)
    assert [(d.pod, d.model, d.switch) for d in shared.assignments] == [("p1", "r", True)]


def test_policies_take_others_and_assign_only_their_own_tasks():
    pods = [PodView(f"p{i}", 1, None) for i in range(4)]
    waiting = tasks(("a", 0.0), ("b", 0.0))
    for policy in (AffinityPolicy(costs=COSTS), FifoPolicy()):
        plan = policy.plan(1.0, waiting, pods, others={"a": 100, "c": 50})
        assert set(assigned(plan)) <= {"t0", "t1"}
