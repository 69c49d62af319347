"""Every `python run.py` command of the README, in order, in a fresh clone, right after the demo: each must exit
0 with no traceback in its output.

The run itself is slow (the demo alone is 5-6 minutes on 2 idle cores), so it is out of the default run and CI:

    python -m pytest -m slow tests/test_readme_commands.py -s      # tests what is committed (a `git clone`)

Commands that need a GPU, a real-scale model or a path the reader fills in (`/path/to`, `...`) are left out; the
others run as written with SMALL's overrides for their recipe appended (fewer steps, fewer rows), so that the
whole list costs minutes, not hours. The cheap test below checks which commands the README yields.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Kept out: what a CPU machine cannot run, or cannot run in minutes.
NEEDS_MORE = ("/path/to", "...", "ouro_1.4b", "cuda", "ouro_cpu", "<recipe>", "X.yaml",
              "fresh=true")  # the demo again from scratch: the first command is that run

# Appended to each kept command of that recipe: the same code paths at a small size.
SMALL: dict[str, list[str]] = {
    "sft": ["training.max_steps=3", "sample.num_prompts=2", "sample.max_new_tokens=16"],
    "grpo": ["training.max_steps=2", "eval.num_prompts=4"],
    "gate": ["training.max_steps=4", "data.train_rows=64", "data.val_rows=16", "data.eval_rows=16", "eval.q_grid=[0.5]",
             "eval.hidden_eps_grid=[0.2]", "eval.kv_modes=[full]", "eval.max_new_tokens=32"],
    "eval": ["data.eval_rows=16", "eval.q_grid=[0.5]", "eval.hidden_eps_grid=[0.2]", "eval.kv_modes=[full]",
             "eval.max_new_tokens=32"],
    "bench": ["rollout.model=runs/looplm-random-tiny", "rollout.parts=[decode_step]", "rollout.batch_sizes=[1]",
              "rollout.repeats=1", "rollout.max_new_tokens=8", "rollout.compile_decode=false",
              # not smaller: at 1,024 x 256 the chunked loss's peak rounds to 0 MB (and the ratio divides by it)
              "loss_memory.vocab_size=8192", "loss_memory.tokens=1024", "loss_memory.hidden_size=128",
              "loss_memory.chunk_tokens=256", "loss_memory.repeats=1", "gate_repair.starts=[zeroed]"],
}


def readme_commands(text: str) -> tuple[list[list[str]], list[str]]:
    """-> (kept commands as argv after `python run.py`, left-out lines), in README order, from its code blocks."""
    kept, left_out = [], []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            for part in line.split("&&"):  # the set-up line: install && python run.py
                command = part.split("  #")[0].strip()
                if not command.startswith("python run.py"):
                    continue
                if any(marker in command for marker in NEEDS_MORE):
                    left_out.append(command)
                else:
                    kept.append(shlex.split(command)[2:])
    return kept, left_out


def small(argv: list[str]) -> list[str]:
    recipe = argv[0] if argv and "=" not in argv[0] and not argv[0].startswith("-") else "demo"
    return argv if "--help" in argv else argv + SMALL.get(recipe, [])


def test_the_readme_yields_the_demo_first_then_every_cpu_recipe():
    kept, left_out = readme_commands((REPO / "README.md").read_text())
    assert kept[0] == []  # `python run.py`, the demo
    recipes = {argv[0] for argv in kept[1:] if argv and not argv[0].startswith("-")}
    assert recipes >= {"sft", "grpo", "gate", "eval", "init", "rollout", "parity", "bench"}
    assert any("ouro_1.4b" in line for line in left_out)
    assert small(["gate", "--config", "x.yaml"])[-1] == SMALL["gate"][-1] and small([]) == []


@pytest.mark.slow
def test_every_readme_command_runs_in_a_fresh_clone(tmp_path):
    clone = tmp_path / "looprl"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    found = subprocess.run([sys.executable, "-c", "import looplm; print(looplm.__file__)"], cwd=clone,
                           capture_output=True, text=True, check=True).stdout
    assert found.startswith(str(clone)), f"the clone's packages must be the ones imported, got {found}"
    kept, left_out = readme_commands((clone / "README.md").read_text())
    print(f"\nleft out ({len(left_out)}): " + "\n  ".join(["", *left_out]))
    failures = []
    for argv in kept:
        argv = small(argv)
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "run.py", *argv], cwd=clone, capture_output=True, text=True,
                             timeout=3600)
        output = run.stdout + run.stderr
        seconds = time.perf_counter() - start
        print(f"{seconds:7.1f} s  exit {run.returncode}  python run.py {shlex.join(argv)}", flush=True)
        if run.returncode != 0 or "Traceback (most recent call last)" in output:
            failures.append(f"python run.py {shlex.join(argv)} (exit {run.returncode}):\n{output[-3000:]}")
    assert not failures, "\n\n".join(failures)
