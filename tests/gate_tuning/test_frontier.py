"""Frontier evaluation: teacher-forced losses as decoding computes them, the q pick, the outputs."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F

from gate_tuning.data import Example, load_examples
from gate_tuning.frontier import (
    FrontierPoint,
    compare_frontiers,
    evaluate_rules,
    frontier_area,
    hidden_diff_rules,
    kv_rules,
    pick_threshold,
    q_exit_rules,
    static_rules,
    teacher_forced,
    write_frontier,
)
from gate_tuning.recipe import ModelSection
from looplm import LoopLMForCausalLM
from rollout.engine import DepthConfig


@pytest.fixture(scope="module")
def setup(checkpoint):
    model = LoopLMForCausalLM.from_pretrained(str(checkpoint)).eval()
    tokenizer = ModelSection(path=str(checkpoint)).tokenizer()
    return model, tokenizer, load_examples("synthetic", "train", 6, 5, tokenizer, 128)


@torch.no_grad()
@pytest.mark.parametrize("same_lengths", [False, True])
def test_static_teacher_forced_loss_is_the_full_forward_at_that_loop(setup, same_lengths):
    model, _, examples = setup
    if same_lengths:  # no padding anywhere: the completion chunk after the cache still needs a causal mask
        examples = [Example(e.prompt_ids[:8], e.completion_ids[:10], None) for e in examples]
    for loops in (1, 3, 4):
        ce_sum, tokens, loops_sum, positions, _ = teacher_forced(model, examples, DepthConfig(num_loops=loops))
        want, count = 0.0, 0
        for e in examples:
            ids = torch.tensor([e.prompt_ids + e.completion_ids])
            logits = model(ids, num_loops=loops, use_cache=False).logits[0, len(e.prompt_ids) - 1 : -1]
            want += F.cross_entropy(logits, torch.tensor(e.completion_ids), reduction="sum").item()
            count += len(e.completion_ids)
        assert tokens == count and positions == count - len(examples)
        assert ce_sum == pytest.approx(want, rel=1e-5)
        assert loops_sum == loops * positions


@torch.no_grad()
def test_adaptive_teacher_forced_loss_replays_with_its_exit_steps(setup):
    """Q-exit decided on the fly in one chunk = the training forward replaying those exits (prompt at T)."""
    model, _, examples = setup
    e = examples[0]
    depth = DepthConfig(policy="adaptive", exit_threshold=0.5)
    ce_sum, tokens, loops_sum, positions, _ = teacher_forced(model, [e], depth)
    assert 1.0 < loops_sum / positions < 4.0
    # Recover the decided exits from a decode-style chunk, then replay them in one full forward.
    ids = torch.tensor([e.prompt_ids + e.completion_ids[:-1]])
    chunk_steps = []
    from looplm import LoopKVCache

    cache = LoopKVCache(model.config)
    model(ids[:, : len(e.prompt_ids)], cache=cache)
    chunk_steps = model(ids[:, len(e.prompt_ids) :], cache=cache, exit_threshold=0.5).exit_steps
    steps = torch.cat([torch.full((1, len(e.prompt_ids)), 4), chunk_steps], dim=1)
    logits = model(ids, exit_steps=steps, use_cache=False).logits[0, len(e.prompt_ids) - 1 :]
    want = F.cross_entropy(logits, torch.tensor(e.completion_ids), reduction="sum").item()
    assert ce_sum == pytest.approx(want, rel=1e-5) and loops_sum == chunk_steps.sum().item()


def test_evaluate_rules_gives_one_point_per_rule(setup):
    model, tokenizer, examples = setup
    rules = [*static_rules(4), *q_exit_rules([0.0, 1.0], "q"), *hidden_diff_rules([0.0]), *kv_rules()]
    points = evaluate_rules(model, tokenizer, examples[:3], rules, batch_size=2, max_new_tokens=4)
    assert [(p.rule, p.param) for p in points] == [(r.rule, r.param) for r in rules]
    by = {(p.rule, p.param): p for p in points}
    assert [by["static", n].avg_loops for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 4.0]
    assert by["q", 0.0].avg_loops == 1.0 and by["q", 1.0].avg_loops == 4.0  # q = 0 exits at once, q = 1 never
    assert by["q", 1.0].loss == pytest.approx(by["static", 4].loss, rel=1e-6)
    assert by["hidden_diff", 0.0].loss == pytest.approx(by["static", 4].loss, rel=1e-6)
    assert by["kv_sharing", "full"].loss == pytest.approx(by["static", 4].loss, rel=1e-6)
    assert by["kv_sharing", "last"].bytes_per_token * 4 == by["kv_sharing", "full"].bytes_per_token
    assert all(p.accuracy is not None and 0.0 <= p.accuracy <= 1.0 for p in points)


def point(rule: str, param, loops: float, acc: float | None, loss: float = 1.0) -> FrontierPoint:
    return FrontierPoint(rule, param, loops, loss, acc, 0, loops)


POINTS = [
    point("static", 1, 1.0, 0.30), point("static", 4, 4.0, 0.80),
    point("tuned", 0.2, 1.5, 0.60), point("tuned", 0.5, 2.2, 0.795), point("tuned", 0.9, 3.0, 0.81),
    point("untuned", 0.2, 1.4, 0.50), point("untuned", 0.5, 2.5, 0.70),
]


def test_pick_threshold_for_an_accuracy_drop_or_a_depth():
    assert pick_threshold(POINTS, "tuned", 4, max_accuracy_drop=0.01).param == 0.5
    assert pick_threshold(POINTS, "tuned", 4, max_accuracy_drop=0.0).param == 0.9
    assert pick_threshold(POINTS, "tuned", 4, max_accuracy_drop=-0.1).param == 1.0  # nothing fits: always T
    assert pick_threshold(POINTS, "tuned", 4, target_avg_loops=2.5).param == 0.5
    assert pick_threshold(POINTS, "tuned", 4, target_avg_loops=1.0).param == 0.2  # none: the shallowest
    with pytest.raises(ValueError, match="exactly one"):
        pick_threshold(POINTS, "tuned", 4)
    with pytest.raises(ValueError, match="no points of rule 'nope'"):
        pick_threshold(POINTS, "nope", 4, target_avg_loops=2.0)


def test_compare_frontiers_interpolates_over_the_common_depth_range():
    a = [point("a", 0.1, 1.0, 0.5), point("a", 0.5, 2.0, 0.8), point("a", 0.9, 3.0, 0.9)]
    b = [point("b", 0.1, 1.5, 0.7), point("b", 0.5, 2.5, 0.8), point("b", 0.9, 4.0, 0.9)]
    # Common range [1.5, 3.0]. A - B at the corners 1.5, 2.0, 2.5, 3.0: 0.65 - 0.70, 0.80 - 0.75, 0.85 - 0.80,
    # 0.90 - (0.80 + 0.10 * 0.5 / 1.5). A crosses B halfway between 1.5 and 2.0.
    ab = compare_frontiers(a, b)
    assert ab.depth_range == (1.5, 3.0)
    assert ab.min_gap == pytest.approx(-0.05) and ab.at_loops == 1.5 and not ab.a_at_or_above_b
    assert ab.below == [(1.5, pytest.approx(1.75))]
    ba = compare_frontiers(b, a)
    assert ba.min_gap == pytest.approx(-0.1 / 1.5) and ba.at_loops == 3.0
    assert ba.below == [(pytest.approx(1.75), 3.0)]
    # Equal curves are "at or above" (no rounding dip), with nothing below.
    same = compare_frontiers(a, [point("c", p.param, p.avg_loops, p.accuracy) for p in a])
    assert same.min_gap == 0.0 and same.a_at_or_above_b and same.below == []
    # Loss: lower is better. A dips below B only inside the range, between two of B's corners.
    la = [point("a", 0, 1.0, None, loss=1.0), point("a", 1, 3.0, None, loss=0.2)]
    lb = [point("b", 0, 1.0, None, loss=1.0), point("b", 1, 2.0, None, loss=0.4), point("b", 2, 3.0, None, loss=0.2)]
    lab = compare_frontiers(la, lb, metric="loss")
    assert lab.min_gap == pytest.approx(-0.2) and lab.at_loops == 2.0 and lab.below == [(1.0, 3.0)]
    assert compare_frontiers(lb, la, metric="loss").a_at_or_above_b


def test_frontier_area_is_the_mean_over_loops_one_to_t():
    full = [point("a", 0.0, 1.0, 0.5), point("a", 0.5, 2.0, 0.8), point("a", 1.0, 4.0, 0.9)]
    assert frontier_area(full, 4) == pytest.approx((0.65 + 2 * 0.85) / 3)
    partial = [point("b", 0.2, 1.5, 0.6), point("b", 0.8, 3.0, 0.9)]  # held flat beyond its ends
    assert frontier_area(partial, 4) == pytest.approx((0.5 * 0.6 + 1.5 * 0.75 + 0.9) / 3)
    loss = [point("c", 0.0, 1.0, None, loss=2.0), point("c", 1.0, 4.0, None, loss=1.0)]
    assert frontier_area(loss, 4, metric="loss") == pytest.approx(-1.5)
    assert math.isnan(frontier_area([], 4))


def test_compare_frontiers_without_overlap_is_nan():
    a, b = [point("a", 0.1, 1.0, 0.5), point("a", 0.2, 1.5, 0.6)], [point("b", 0.5, 2.0, 0.8)]
    assert math.isnan(compare_frontiers(a, b).min_gap)
    assert math.isnan(compare_frontiers([], b).min_gap)


def test_outputs_csv_markdown_and_png(tmp_path):
    paths = write_frontier(POINTS + [point("kv_sharing", "last", 4.0, 0.7)], tmp_path, title="t")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {"rule", "param", "avg_loops", "loss", "accuracy", "bytes_per_token"} <= set(rows[0])
    assert len(rows) == 8 and rows[2]["rule"] == "tuned"
    assert paths["md"].read_text().count("\n") == 10
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_bootstrap_intervals_hold_the_estimate_and_narrow_with_more_examples():
    from gate_tuning.frontier import ExampleScores

    def scores(n: int) -> ExampleScores:  # 3 of 4 correct; every example 10 positions at 2 or 3 loops on average
        return ExampleScores([i % 4 != 0 for i in range(n)], [10] * n, [20 + 10 * (i % 2) for i in range(n)])

    small, large = scores(64), scores(1024)
    for s in (small, large):
        ci = s.intervals(resamples=500)
        assert ci["accuracy"][0] < s.accuracy == 0.75 < ci["accuracy"][1]
        assert ci["avg_loops"][0] < s.avg_loops == 2.5 < ci["avg_loops"][1]
    width = {n: s.intervals(resamples=500)["accuracy"] for n, s in ((64, small), (1024, large))}
    assert width[1024][1] - width[1024][0] < 0.5 * (width[64][1] - width[64][0])  # ~1/sqrt(n): 4x narrower
    # The binomial standard error at n = 64 is 5.4 points: a 95% interval spans about 21 points.
    assert 0.15 < width[64][1] - width[64][0] < 0.27
    constant = ExampleScores([True] * 8, [5] * 8, [10] * 8).intervals(resamples=100)
    assert constant == {"accuracy": (1.0, 1.0), "avg_loops": (2.0, 2.0)}
