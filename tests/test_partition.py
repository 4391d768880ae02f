"""mplib.partition: `optimal` equals exhaustive search with the simulator as the oracle; its bounds never overshoot."""

import itertools
import math
import random

import numpy as np
import pytest
import torch

import mplib.hardware
from mplib import _gpipe
from mplib._problem import for_schedule
from mplib.partition import _Problem, by_params, by_time, evaluate, optimal, uniform
from mplib.profile import BlockCosts
from mplib.schedule import build
from mplib.simulate import simulate

# --- an exhaustive search, written from the partition docstring, timed by mplib.simulate ----------


def stage_costs(case, edges):
    """Per-stage forward, backward, one-way transfer and per-device memory of one split, by hand."""
    costs, k, v = case["costs"], case["k"], case.get("virtual", 1)
    speeds = case["speeds"] or [1.0] * k
    S = k * v
    fwd = [sum(costs.forward[edges[s]:edges[s + 1]]) / speeds[s % k] for s in range(S)]
    bwd = [sum(costs.backward[edges[s]:edges[s + 1]]) / speeds[s % k] for s in range(S)]
    links = case["links"]
    if links is None:
        sends = [0.0] * (S - 1)
    else:
        pairs = [links] * (S - 1) if isinstance(links, tuple) else list(links)
        sends = [costs.boundary_bytes[edges[s + 1] - 1] / bw + lat for s, (bw, lat) in enumerate(pairs)]
    schedule = build(case["schedule"], k, case["chunks"], v)
    memory = []
    for d, actions in enumerate(schedule.actions):  # what each device holds after each of its actions
        act = {s: sum(costs.activation_bytes[edges[s]:edges[s + 1]]) for s in range(d, S, k)}
        held, peak = {s: 0 for s in act}, 0
        for a in actions:
            held[a.stage] += 1 if a.kind == "F" else -1
            peak = max(peak, sum(held[s] * act[s] for s in act))
        memory.append(sum(sum(costs.state_bytes[edges[s]:edges[s + 1]]) for s in act) + peak)
    return schedule, fwd, bwd, sends, memory


def brute_force(case):
    """(least simulated step, its balance) over every contiguous split that fits, or (inf, None)."""
    n, S = len(case["costs"]), case["k"] * case.get("virtual", 1)
    best, best_balance = math.inf, None
    for cuts in itertools.combinations(range(1, n), S - 1):
        edges = (0, *cuts, n)
        schedule, fwd, bwd, sends, memory = stage_costs(case, edges)
        if case["memory"] is not None and any(m > lim for m, lim in zip(memory, case["memory"])):
            continue
        step = simulate(schedule, fwd, bwd, sends).end
        if step < best:
            best, best_balance = step, [b - a for a, b in zip(edges, edges[1:])]
    return best, best_balance


def random_instance(rng: random.Random) -> dict:
    """Random costs (backward 1-3x forward, or any), speeds, links and memory; integers half the time for ties."""
    schedule = rng.choice(["gpipe", "1f1b", "1f1b", "interleaved"])
    v = 2 if schedule == "interleaved" else 1
    k = rng.randint(1, 4 if v == 1 else 2)
    n = rng.randint(k * v, 9)
    chunks = rng.randint(k, 8) if schedule == "1f1b" else (k * rng.randint(1, 3) if v > 1 else rng.randint(1, 8))
    ints = rng.random() < 0.5
    forward = [rng.randint(0, 5) if ints else rng.uniform(0.1, 2.0) for _ in range(n)]
    backward = ([f * rng.choice([1, 2, 3]) for f in forward] if ints else [f * rng.uniform(1, 3) for f in forward]) \
        if rng.random() < 0.7 else [rng.uniform(0, 5) for _ in range(n)]
    costs = BlockCosts(forward=forward, backward=backward, param_bytes=[rng.randint(0, 100) for _ in range(n)],
                       optimizer_bytes=[rng.randint(0, 200) for _ in range(n)],
                       activation_bytes=[rng.randint(0, 50) for _ in range(n)],
                       boundary_bytes=[rng.randint(0, 1000) for _ in range(n)])
    speeds = [rng.choice([0.5, 1.0, 1.0, 2.0, 3.0]) for _ in range(k)] if rng.random() < 0.4 else None
    links = None
    if rng.random() < 0.5:
        links = (rng.choice([100.0, 300.0, 1000.0]), rng.choice([0.0, 0.5]))
        if rng.random() < 0.5:
            links = [(rng.choice([100.0, 300.0, 1000.0]), rng.choice([0.0, 0.5])) for _ in range(k * v - 1)]
    total = sum(costs.state_bytes) + 8 * sum(costs.activation_bytes)
    memory = [rng.randint(total // (2 * k), total) for _ in range(k)] if rng.random() < 0.4 else None
    return dict(costs=costs, k=k, schedule=schedule, chunks=chunks, speeds=speeds, links=links, memory=memory,
                virtual=v)


def options(case):
    return dict(schedule=case["schedule"], chunks=case["chunks"], speeds=case["speeds"], links=case["links"],
                memory=case["memory"], virtual=case["virtual"])


def test_optimal_has_the_least_simulated_step_of_every_split_on_1200_random_instances():
    rng, infeasible, feasible, by_schedule = random.Random(6), 0, 0, {}
    for trial in range(1200):
        case = random_instance(rng)
        want, _ = brute_force(case)
        if want == math.inf:
            infeasible += 1
            with pytest.raises(ValueError, match="fits"):
                optimal(case["costs"], case["k"], **options(case))
            continue
        feasible += 1
        by_schedule[case["schedule"]] = by_schedule.get(case["schedule"], 0) + 1
        plan = optimal(case["costs"], case["k"], **options(case), max_nodes=None)
        assert plan.fits and sum(plan.balance) == len(case["costs"]) and min(plan.balance) >= 1 and plan.gap == 0
        # float sums in another order: the steps agree to rounding, not bit for bit
        assert math.isclose(plan.step_time, want, rel_tol=1e-9, abs_tol=1e-12), (trial, case, plan.balance)
        again = evaluate(case["costs"], plan.balance, case["k"], **options(case))
        assert math.isclose(again.step_time, want, rel_tol=1e-9, abs_tol=1e-12)
    assert infeasible >= 30 and feasible >= 1000 and min(by_schedule.values()) >= 150, by_schedule


def test_a_search_bound_never_exceeds_the_best_step_of_the_splits_below_it():
    # the search prunes a node whose bound reaches the best step found: a bound above the best
    # completion would lose the optimum. Every node of every random instance, checked by enumeration.
    rng, nodes = random.Random(11), 0
    for _ in range(250):
        case = random_instance(rng)
        prob = _Problem(case["costs"], case["k"], case["schedule"], case["chunks"], case["speeds"], case["links"],
                        case["memory"], case["virtual"])
        bound = for_schedule(prob.search)
        if not hasattr(bound, "children"):  # GPipe: exact by its formula, checked against the simulator below
            bound = _gpipe.SlowestBackwardBound(prob.search, case["chunks"] - 1)
            objective = bound.objective
        else:
            objective = lambda b: float(prob.search.step(np.asarray(b))[0])  # noqa: E731
        frontier = [bound.root()]
        while frontier:
            node = frontier.pop()
            best = min((objective(np.asarray(node.bounds + rest)) for rest in _completions(prob.search, node)),
                       default=math.inf)
            assert node.lb <= best * (1 + 1e-9), (case, node.bounds, node.lb, best)
            nodes += 1
            if node.s < prob.S:
                frontier += bound.children(node, math.inf)
    assert nodes > 2000


def _completions(p, node):
    """Every way to end the stages after `node` that fits memory."""
    left = p.S - node.s
    for cuts in ([()] if left == 0 else itertools.combinations(range(node.j + 1, p.n), left - 1)):
        bounds = np.array(node.bounds + ((*cuts, p.n) if left else ()))
        if all(bounds[s + 1] <= p.mem_hi[s, bounds[s]] for s in range(p.S)) and (
                p.device_fits is None or p.device_fits(bounds)):
            yield tuple(int(x) for x in bounds[len(node.bounds):])


def test_gpipe_step_is_base_plus_m_minus_1_slowest_forward_and_backward():
    # the closed form GPipe's search minimises, against the simulator
    rng = random.Random(2)
    for _ in range(300):
        k, m = rng.randint(1, 5), rng.randint(1, 8)
        f, b = [rng.uniform(0, 2) for _ in range(k)], [rng.uniform(0, 4) for _ in range(k)]
        c = [rng.choice([0.0, rng.uniform(0, 1)]) for _ in range(k - 1)]
        step = simulate(build("gpipe", k, m), f, b, c).end
        assert step == pytest.approx(sum(f) + sum(b) + 2 * sum(c) + (m - 1) * (max(f) + max(b)), rel=1e-12)


def test_a_search_that_runs_out_of_nodes_warns_and_certifies_its_gap():
    rng = random.Random(5)
    n, k = 40, 8
    forward = [rng.uniform(0.5, 1.5) for _ in range(n)]
    costs = BlockCosts(forward=forward, backward=[f * rng.uniform(1, 3) for f in forward],
                       boundary_bytes=[rng.randint(1, 1000) for _ in range(n)])
    exact = optimal(costs, k, chunks=k, links=(1000.0, 0.0), max_nodes=None)
    assert exact.gap == 0 and exact.searched > 1
    with pytest.warns(UserWarning, match=r"optimal stopped after 1 search nodes: its plan is at most"):
        cut = optimal(costs, k, chunks=k, links=(1000.0, 0.0), max_nodes=1)
    assert cut.gap > 0 and cut.step_time >= exact.step_time * (1 - 1e-9)
    assert cut.step_time * (1 - cut.gap) <= exact.step_time * (1 + 1e-9)  # the gap it reports holds


def test_infeasible_memory_error_states_the_exact_smallest_memory_that_works():
    rng, checked = random.Random(7), 0
    while checked < 150:
        case = random_instance(rng)
        if case["virtual"] > 1:
            continue
        case.update(memory=None, speeds=None, links=None)
        costs, k, n = case["costs"], case["k"], len(case["costs"])
        # the smallest equal limit: the least, over splits, of the largest device's memory
        smallest = min(max(stage_costs(case, (0, *c, n))[4]) for c in itertools.combinations(range(1, n), k - 1))
        if smallest < 2:
            continue
        with pytest.raises(ValueError) as err:
            optimal(costs, k, schedule=case["schedule"], chunks=case["chunks"], memory=smallest - 1)
        if "smallest per-device memory" in str(err.value):
            assert f"works is {smallest:,} bytes" in str(err.value)
            checked += 1
        else:
            assert "alone fits no device" in str(err.value)
        plan = optimal(costs, k, schedule=case["schedule"], chunks=case["chunks"], memory=smallest)
        assert plan.fits and max(plan.memory) <= smallest


def test_plans_of_optimal_and_evaluate_feed_simulate():
    costs = BlockCosts(forward=[1.0, 1.0, 1.0, 3.0], backward=[2.0, 2.0, 2.0, 6.0], boundary_bytes=[10] * 4)
    for schedule, virtual in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2)):
        plan = optimal(costs, 2 if virtual == 1 else 1, schedule=schedule, chunks=2, links=(100.0, 0.0),
                       virtual=virtual)
        tl = simulate(plan.build(), plan.forward, plan.backward, plan.transfer)
        assert tl.end == pytest.approx(plan.step_time, rel=1e-12)


def test_links_from_the_catalog_are_accepted_and_priced_in_bytes_per_second():
    costs = BlockCosts(forward=[1e-3] * 4, backward=[2e-3] * 4, boundary_bytes=[2**20] * 4)
    pcie = mplib.hardware.LINKS["PCIe 4.0 x16"]
    plan = optimal(costs, 2, chunks=4, links=pcie)
    assert plan.transfer == [pytest.approx(2**20 / (31.5e9) + pcie.latency)]
    assert optimal(costs, 2, chunks=4, links=[pcie]).balance == plan.balance


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
    # GPipe: base + (M-1)(slowest forward + slowest backward)
    assert even.step_time == pytest.approx(48.3 + 7 * 18) and plan.step_time == pytest.approx(48.3 + 7 * 12.3)


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
    assert "of it in stage 1" in text and "cut 0 (after block 1)" in text and "would need" in text


def test_the_bottleneck_is_the_stage_the_critical_path_spends_most_time_in():
    costs = BlockCosts(forward=[1.0, 1.0, 1.0, 3.0], backward=[2.0, 2.0, 2.0, 6.0])
    plan = evaluate(costs, [3, 1], 2, schedule="1f1b", chunks=4)
    # 1F1B on 2 devices: stage 1 (9 per micro-batch) runs its 4 micro-batches back to back on the path
    assert plan.bottleneck == "stage 1" and plan.path_share == pytest.approx(4 * 9 / plan.step_time)


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
        optimal(costs, 4, chunks=4)


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
    with pytest.raises(ValueError, match="interleaved needs virtual >= 2"):
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
    assert len(memory_ax.collections) == 3  # one dashed limit per device
    plt.close(ax.figure)
