"""mplib.partition: `optimal` equals exhaustive search; the cost model agrees with the simulator."""

import itertools
import math
import random
import re
import time

import pytest
import torch

from mplib.partition import Plan, by_params, by_time, evaluate, in_flight, optimal, uniform
from mplib.profile import BlockCosts
from mplib.schedule import build
from mplib.simulate import simulate

# --- an exhaustive search, written from the cost model in the partition docstring --------------


def brute_force(costs, k, schedule, chunks, speeds, links, memory):
    """(best step time, its balance) over every contiguous split, or (inf, None) if none fits."""
    n = len(costs.forward)
    speeds = speeds or [1.0] * k
    links = links if links is not None else None
    grads = costs.grad_bytes
    flight = [chunks if schedule == "gpipe" else min(chunks, k - s) for s in range(k)]
    best, best_balance = math.inf, None
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        stages, fits = [], True
        for s in range(k):
            i, j = edges[s], edges[s + 1]
            held = sum(costs.param_bytes[b] + grads[b] + costs.optimizer_bytes[b] for b in range(i, j))
            held += flight[s] * sum(costs.activation_bytes[b] for b in range(i, j))
            if memory is not None and held > memory[s]:
                fits = False
            stages.append(sum(costs.forward[b] + costs.backward[b] for b in range(i, j)) / speeds[s])
        if not fits:
            continue
        sends = []
        if links is not None:
            for s in range(k - 1):
                bandwidth, latency = links[s]
                sends.append(2 * (costs.boundary_bytes[edges[s + 1] - 1] / bandwidth + latency))
        step = (chunks - 1) * max(stages + sends) + sum(stages) + sum(sends)
        if step < best:
            best, best_balance = step, [edges[s + 1] - edges[s] for s in range(k)]
    return best, best_balance


def random_instance(rng: random.Random) -> dict:
    """Random costs, speeds, links and memory limits; small integers half the time to force ties."""
    n, k = rng.randint(1, 12), rng.randint(1, 5)
    k = min(k, n)
    ints = rng.random() < 0.5

    def draw(low, high):
        return [rng.randint(low, high) if ints else rng.uniform(low, high) for _ in range(n)]

    costs = BlockCosts(forward=draw(0, 5), backward=draw(0, 9), param_bytes=[rng.randint(0, 100) for _ in range(n)],
                       optimizer_bytes=[rng.randint(0, 200) for _ in range(n)],
                       activation_bytes=[rng.randint(0, 50) for _ in range(n)],
                       boundary_bytes=[rng.randint(0, 1000) for _ in range(n)])
    speeds = [rng.choice([0.5, 1.0, 1.0, 2.0, 3.0]) for _ in range(k)] if rng.random() < 0.6 else None
    links = ([(rng.choice([100.0, 300.0, 1000.0]), rng.choice([0.0, 0.5])) for _ in range(k - 1)]
             if rng.random() < 0.6 else None)
    total = sum(costs.state_bytes) + 8 * sum(costs.activation_bytes)
    memory = [rng.randint(total // (2 * k), total) for _ in range(k)] if rng.random() < 0.5 else None
    return dict(costs=costs, k=k, schedule=rng.choice(["gpipe", "1f1b"]), chunks=rng.randint(1, 8),
                speeds=speeds, links=links, memory=memory)


def test_optimal_equals_exhaustive_search_on_1200_random_instances():
    rng, infeasible, feasible = random.Random(6), 0, 0
    for trial in range(1200):
        case = random_instance(rng)
        want, _ = brute_force(**case)
        kwargs = dict(schedule=case["schedule"], chunks=case["chunks"], speeds=case["speeds"],
                      links=case["links"], memory=case["memory"])
        if want == math.inf:
            infeasible += 1
            with pytest.raises(ValueError, match="fits|needs"):
                optimal(case["costs"], case["k"], **kwargs)
            continue
        feasible += 1
        plan = optimal(case["costs"], case["k"], **kwargs)
        assert plan.fits and sum(plan.balance) == len(case["costs"]) and min(plan.balance) >= 1
        # float sums in another order: the step times agree to rounding, not bit for bit
        assert math.isclose(plan.step_time, want, rel_tol=1e-9, abs_tol=1e-12), (trial, case, plan.balance)
        assert math.isclose(evaluate(case["costs"], plan.balance, case["k"], **kwargs).step_time, want,
                            rel_tol=1e-9, abs_tol=1e-12)
    assert infeasible >= 50 and feasible >= 1000  # both branches really ran


def test_infeasible_memory_error_states_the_exact_smallest_memory_that_works():
    rng, checked = random.Random(7), 0
    while checked < 150:
        case = random_instance(rng)
        costs, k = case["costs"], case["k"]
        need, _ = brute_force(costs, k, case["schedule"], case["chunks"], None, None, None)
        # the smallest equal limit: the least, over splits, of the largest stage memory
        flight = in_flight(case["schedule"], k, case["chunks"])
        smallest = min(max(sum(costs.state_bytes[e[s]:e[s + 1]])
                               + flight[s] * sum(costs.activation_bytes[e[s]:e[s + 1]]) for s in range(k))
                       for e in ((0, *c, len(costs)) for c in itertools.combinations(range(1, len(costs)), k - 1)))
        if smallest < 2 or need == math.inf:
            continue
        # a block fits no device when even its smallest need (fewest micro-batches in flight) is too big
        biggest_block = max(min(costs.state_bytes[b] + flight[s] * costs.activation_bytes[b] for s in range(k))
                            for b in range(len(costs)))
        with pytest.raises(ValueError) as err:
            optimal(costs, k, schedule=case["schedule"], chunks=case["chunks"], memory=smallest - 1)
        if "smallest per-device memory" in str(err.value):
            assert f"works is {smallest:,} bytes" in str(err.value)
            checked += 1
        else:
            assert "alone fits no device" in str(err.value) and biggest_block > smallest - 1
        plan = optimal(costs, k, schedule=case["schedule"], chunks=case["chunks"], memory=smallest)
        assert plan.fits and max(plan.memory) <= smallest


@pytest.mark.slow
def test_optimal_splits_1000_blocks_over_64_devices_in_under_half_a_second():
    rng = random.Random(0)
    n, k = 1000, 64
    costs = BlockCosts(forward=[rng.uniform(0.5, 2) for _ in range(n)], backward=[rng.uniform(1, 4) for _ in range(n)],
                       param_bytes=[rng.randint(1, 1000) for _ in range(n)],
                       activation_bytes=[rng.randint(1, 1000) for _ in range(n)],
                       boundary_bytes=[rng.randint(1, 1000) for _ in range(n)])
    memory = sum(costs.state_bytes) // k * 3 + 60_000
    optimal(costs, k, chunks=8)  # warm-up: numpy's first calls allocate
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        plan = optimal(costs, k, chunks=8, memory=memory, links=(1e5, 1e-3))
        seconds.append(time.perf_counter() - start)
    assert plan.fits and len(plan.balance) == k
    assert sorted(seconds)[1] < 0.5, seconds  # the target; ~0.1 s on a quiet 2-core CPU


# --- the cost model against the simulator ---------------------------------------------------


def per_stage_plan(k, chunks, schedule, proportional, rng, links=None):
    n = rng.randint(k, 10)
    forward = [rng.uniform(0.1, 2.0) for _ in range(n)]
    backward = [2 * f for f in forward] if proportional else [rng.uniform(0.1, 4.0) for _ in range(n)]
    costs = BlockCosts(forward=forward, backward=backward, boundary_bytes=[rng.randint(1, 100) for _ in range(n)])
    return optimal(costs, k, schedule=schedule, chunks=chunks, links=links)


def simulated_step(plan):
    return simulate(build(plan.schedule, len(plan.balance), plan.chunks), plan.forward, plan.backward,
                    plan.transfer).end


def test_gpipe_step_time_equals_the_simulated_one_when_backward_is_twice_forward_everywhere():
    rng = random.Random(1)
    for _ in range(200):
        k = rng.randint(1, 4)
        # slow enough links that transfers matter, fast enough that no cut is the bottleneck
        plan = per_stage_plan(k, rng.randint(1, 8), "gpipe", True, rng, links=(1000.0, 0.01))
        assert plan.bottleneck.startswith("stage")
        torch.testing.assert_close(simulated_step(plan), plan.step_time, rtol=1e-12, atol=0)  # same sums, reordered


def test_gpipe_step_time_is_a_lower_bound_of_the_simulated_one_for_any_backward():
    rng, strict = random.Random(2), 0
    for _ in range(200):
        plan = per_stage_plan(rng.randint(2, 4), rng.randint(2, 8), "gpipe", False, rng, links=(1000.0, 0.01))
        sim = simulated_step(plan)
        assert sim >= plan.step_time * (1 - 1e-12)
        strict += sim > plan.step_time * (1 + 1e-9)  # the slowest forward and backward sit on different stages
    assert strict > 0


def test_1f1b_step_time_is_an_upper_bound_without_transfers_and_exact_when_the_last_stage_is_slowest():
    rng, exact = random.Random(3), 0
    for _ in range(300):
        k = rng.randint(1, 4)
        plan = per_stage_plan(k, rng.randint(k, 8), "1f1b", rng.random() < 0.5, rng)
        sim = simulated_step(plan)
        assert sim <= plan.step_time * (1 + 1e-12)
        if plan.bottleneck == f"stage {k - 1}":
            exact += 1
            torch.testing.assert_close(sim, plan.step_time, rtol=1e-12, atol=0)
    assert exact >= 20


def test_in_flight_matches_the_peak_of_the_built_schedules():
    for name in ("gpipe", "1f1b"):
        for k in range(1, 5):
            for m in range(k, 9):
                assert in_flight(name, k, m) == build(name, k, m).peak_in_flight()


# --- what the balancers choose ------------------------------------------------------------


def test_uniform_gives_the_remainder_to_the_first_stages():
    assert uniform(10, 4) == [3, 3, 2, 2]
    assert uniform(8, 4) == [2, 2, 2, 2]


def test_by_params_and_by_time_minimise_their_largest_stage_like_exhaustive_search():
    rng = random.Random(4)
    for _ in range(200):
        n, k = rng.randint(1, 9), rng.randint(1, 4)
        k = min(k, n)
        costs = BlockCosts(forward=[rng.randint(0, 9) for _ in range(n)],
                           backward=[rng.randint(0, 9) for _ in range(n)], param_bytes=[rng.randint(0, 99) for _ in range(n)])
        for balancer, weights in ((by_params, costs.param_bytes), (by_time, costs.time)):
            def largest(balance):
                edges = [0] + list(itertools.accumulate(balance))
                return max(sum(weights[edges[s]:edges[s + 1]]) for s in range(k))
            best = min(largest([b - a for a, b in zip((0, *c), (*c, n))])
                       for c in itertools.combinations(range(1, n), k - 1))
            assert largest(balancer(costs, k)) == pytest.approx(best)


def test_a_heavy_head_stands_alone_in_the_optimal_plan_and_uniform_is_slower():
    # an embedding, 12 layers and a head costing 4 layers (GPT-2 small's 50257-token head is ~4.5)
    costs = BlockCosts(forward=[0.1] + [1.0] * 12 + [4.0], backward=[0.2] + [2.0] * 12 + [8.0])
    plan = optimal(costs, 4, schedule="gpipe", chunks=8)
    assert plan.balance == [5, 4, 4, 1] and plan.bottleneck == "stage 0"
    even = evaluate(costs, uniform(14, 4), 4, schedule="gpipe", chunks=8)
    assert even.balance == [4, 4, 3, 3] and even.bottleneck == "stage 3"  # two layers share the head's stage
    assert even.step_time == pytest.approx(7 * 18 + 48.3) and plan.step_time == pytest.approx(7 * 12.3 + 48.3)


def test_a_twice_as_fast_device_gets_about_twice_the_blocks():
    costs = BlockCosts(forward=[1.0] * 12, backward=[2.0] * 12)
    assert optimal(costs, 2, chunks=8, speeds=[1.0, 2.0]).balance == [4, 8]


def test_a_slow_link_moves_the_cut_to_the_smallest_activation():
    costs = BlockCosts(forward=[1.0] * 6, backward=[2.0] * 6, boundary_bytes=[1000, 1000, 1000, 10, 1000, 1000])
    assert optimal(costs, 2, chunks=4).balance == [3, 3]
    plan = optimal(costs, 2, chunks=4, links=(100.0, 0.0))  # 1000 bytes take 10 s each way, 10 bytes 0.1 s
    assert plan.balance == [4, 2] and plan.transfer == [0.1]


def test_a_memory_limit_moves_blocks_off_the_full_device_and_explain_says_why():
    costs = BlockCosts(forward=[1.0] * 6, backward=[2.0] * 6, param_bytes=[100] * 6)
    free = optimal(costs, 2, chunks=4)
    assert free.balance == [3, 3]
    plan = optimal(costs, 2, chunks=4, memory=[2 * 200, 4 * 200])  # params + grads: 200 bytes per block
    assert plan.balance == [2, 4] and plan.fits
    text = plan.explain()
    assert "bottleneck: stage 1" in text and "cut 0 (after block 1)" in text and "would need" in text


def test_plan_costs_feed_simulate_and_its_bottleneck_is_the_busiest_lane():
    costs = BlockCosts(forward=[1.0, 1.0, 1.0, 3.0], backward=[2.0, 2.0, 2.0, 6.0])
    plan = optimal(costs, 2, schedule="gpipe", chunks=4)
    tl = simulate(build("gpipe", 2, 4), plan.forward, plan.backward, plan.transfer)
    busiest = max(range(2), key=lambda lane: tl.busy(lane))
    assert plan.bottleneck == f"stage {busiest}" and tl.end == pytest.approx(plan.step_time)


# --- bad input ------------------------------------------------------------------------------


def test_costs_of_the_wrong_length_are_rejected():
    with pytest.raises(ValueError, match=r"backward has 1 entries but forward has 2 blocks"):
        BlockCosts(forward=[1.0, 2.0], backward=[1.0])
    with pytest.raises(ValueError, match=r"speeds has 3 entries but there are 2 devices"):
        optimal(BlockCosts(forward=[1.0] * 4, backward=[1.0] * 4), 2, speeds=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"links has 2 entries but there are 1 cuts"):
        optimal(BlockCosts(forward=[1.0] * 4, backward=[1.0] * 4), 2, links=[1e9, 1e9])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_negative_nan_and_infinite_costs_are_rejected(bad):
    with pytest.raises(ValueError, match=r"forward\[1\] = .*finite numbers >= 0"):
        BlockCosts(forward=[1.0, bad], backward=[1.0, 1.0])


def test_zero_devices_and_more_devices_than_blocks_are_rejected():
    costs = BlockCosts(forward=[1.0] * 3, backward=[1.0] * 3)
    with pytest.raises(ValueError, match="no devices given"):
        optimal(costs, 0)
    with pytest.raises(ValueError, match="no devices given"):
        optimal(costs, [])
    with pytest.raises(ValueError, match="3 blocks cannot fill 4 stages"):
        optimal(costs, 4)


def test_a_memory_limit_no_plan_can_meet_names_the_smallest_that_works():
    costs = BlockCosts(forward=[1.0] * 4, backward=[1.0] * 4, param_bytes=[100] * 4)  # 200 B per block held
    with pytest.raises(ValueError, match=r"smallest per-device memory that works is 400 bytes"):
        optimal(costs, 2, memory=399)
    assert optimal(costs, 2, memory=400).balance == [2, 2]


def test_a_block_larger_than_any_device_is_named():
    costs = BlockCosts(forward=[1.0] * 3, backward=[1.0] * 3, param_bytes=[10, 500, 10], names=["a", "big", "c"])
    with pytest.raises(ValueError, match=r"block 1 \(big\) alone fits no device: it needs 1,000"):
        optimal(costs, 2, memory=[600, 900])


def test_other_bad_options_are_rejected_with_the_fix():
    costs = BlockCosts(forward=[1.0] * 4, backward=[1.0] * 4)
    with pytest.raises(TypeError, match="costs must be an mplib.profile.BlockCosts"):
        optimal([1.0] * 4, 2)
    with pytest.raises(ValueError, match="schedule 'interleaved' is not one of"):
        optimal(costs, 2, schedule="interleaved")
    with pytest.raises(ValueError, match="chunks .* must be an int >= 1"):
        optimal(costs, 2, chunks=0)
    with pytest.raises(ValueError, match="speeds must be finite and > 0"):
        optimal(costs, 2, speeds=[1.0, 0.0])
    with pytest.raises(ValueError, match="a link needs bandwidth > 0"):
        optimal(costs, 2, links=0.0)
    with pytest.raises(ValueError, match=r"balance \[3, 2\] must have 2 positive entries summing to 4"):
        evaluate(costs, [3, 2], 2)


# --- a Plan drives split and Pipeline -------------------------------------------------------


def test_split_and_pipeline_take_a_plan_and_match_the_single_device_gradients():
    import copy

    from mplib.models.gpt import GPT, GPTConfig
    from mplib.pipeline import Pipeline
    from mplib.profile import measure
    from mplib.split import split
    from mplib.train import lm_loss

    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=3, n_head=2, n_embd=16))
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (4, 16))
    plan = optimal(measure(model, ids[:2], repeats=1), ["cpu", "cpu"], schedule="gpipe", chunks=2)
    pipe = Pipeline(split(model, plan.devices, plan), chunks=plan.chunks, schedule=plan.schedule, loss_fn=lm_loss)
    assert pipe.model.balance == plan.balance
    loss = pipe.step(ids[:, :-1], ids[:, 1:])
    ref_loss = lm_loss(ref(ids[:, :-1]), ids[:, 1:])
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    mine = pipe.model.state_dict(keep_vars=True)
    for name, p in ref.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(mine[name].grad, p.grad, msg=lambda m: f"{name}: {m}")


def test_plot_plan_draws_time_and_memory_bars_per_stage_and_each_limit():
    import matplotlib.pyplot as plt

    import mplib.plot

    costs = BlockCosts(forward=[1e-3] * 6, backward=[2e-3] * 6, param_bytes=[2**20] * 6)
    plan = optimal(costs, 3, chunks=4, memory=[4 * 2**20, 8 * 2**20, 4 * 2**20])
    ax = mplib.plot.plan(plan)
    memory_ax = [a for a in ax.figure.axes if a is not ax][0]
    assert len(ax.patches) == 3 and len(memory_ax.patches) == 3
    assert [round(p.get_height(), 6) for p in ax.patches] == [round(t * 1e3, 6) for t in plan.stage_times]
    assert len(memory_ax.collections) == 3  # one dashed limit per stage
    plt.close(ax.figure)
