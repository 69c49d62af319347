"""The depth-RL sweep's evaluation problems: fresh, disjoint, and the bootstrap table (bench/depth_rl.py)."""

from __future__ import annotations

import pytest

from bench.depth_rl import RL_TASK, DepthRLBenchConfig, fresh_rows, markdown, problem_sets, prompt_text
from configs import UserError


def test_the_evaluation_problems_are_disjoint_from_training_and_from_each_other():
    config = DepthRLBenchConfig(test_rows=512, val_rows=256)
    test, val, trained = problem_sets(config)
    trained_prompts = {prompt_text(r) for rows, seed in config.trained_rows for r in RL_TASK.rows(rows, seed)}
    assert len(trained_prompts) == trained > 2000
    test_prompts, val_prompts = [prompt_text(r) for r in test], [prompt_text(r) for r in val]
    assert len(set(test_prompts)) == 512 and len(set(val_prompts)) == 256
    assert not set(test_prompts) & trained_prompts and not set(val_prompts) & trained_prompts
    assert not set(test_prompts) & set(val_prompts)
    assert problem_sets(config)[0] == test  # seeded


def test_more_fresh_problems_than_the_task_has_is_a_user_error():
    tiny = type(RL_TASK)(operators="+", modulus=10, num_ops=(1, 1), max_operand=3)  # 9 distinct problems
    assert len(fresh_rows(tiny, 9, 0, set())) == 9
    with pytest.raises(UserError, match="fresh problems"):
        fresh_rows(tiny, 10, 0, set())


def test_the_table_shows_intervals_and_the_picked_q():
    point = {"method": "m", "rule": "q_exit", "param": 0.4, "picked": True, "accuracy": 0.5, "accuracy_ci": (0.4, 0.6),
             "avg_loops": 2.25, "avg_loops_ci": (2.0, 2.5)}
    assert "| m | q_exit (picked on validation) | 0.4 | 50.0% [40.0, 60.0] | 2.25 [2.00, 2.50] |" in markdown([point])


def test_q_is_picked_for_the_budget_on_the_validation_problems(monkeypatch):
    from bench.depth_rl import Evaluator
    from gate_tuning.frontier import ExampleScores

    # (accuracy of 200 problems, loops per position) per policy: q 0.4 is the shallowest within 1 point of static 4
    table = {"fixed": (180, 4.0), 0.2: (170, 1.5), 0.4: (179, 2.0), 0.6: (180, 2.5)}

    def scores(self, engine, examples, depth):
        right, loops = table[depth.policy if depth.policy == "fixed" else depth.exit_threshold]
        return ExampleScores([i < right for i in range(200)], [10] * 200, [int(10 * loops)] * 200)

    monkeypatch.setattr(Evaluator, "scores", scores)
    evaluator = Evaluator([], [], DepthRLBenchConfig(q_grid=[0.2, 0.4, 0.6]))
    assert evaluator.pick_q(None, [], num_loops=4) == 0.4
    table[0.4] = (176, 2.0)  # now 2 points below: the next q fits
    assert evaluator.pick_q(None, [], num_loops=4) == 0.6
