"""LoopRL's one command-line entry.

    python run.py                                   # the small CPU end-to-end demo
    python run.py <recipe> [--config FILE] [key=value ...]

Each recipe is a `*Config` dataclass and a function taking it; the YAML file and the overrides only change
the dataclass defaults (unknown keys fail with the key named). The resolved config is printed, and recipes
that write outputs save it beside them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

import yaml

from configs import ConfigError, load_config, to_dict

# recipe name -> (module, config class, function); imported lazily so that one recipe's imports
# (Ray, TRL, vLLM) cost nothing to the others.
RECIPES: dict[str, tuple[str, str, str]] = {
    "demo": ("posttrain.demo", "DemoConfig", "run_demo"),
    "init": ("rollout.cli", "InitConfig", "run_init"),
    "sft": ("posttrain.sft", "SFTRecipeConfig", "run_sft"),
    "grpo": ("posttrain.grpo", "GRPORecipeConfig", "run_grpo"),
    "rollout": ("rollout.cli", "RolloutRecipeConfig", "run_rollout"),
    "parity": ("rollout.cli", "ParityRecipeConfig", "run_parity"),
    "bench": ("bench.run", "BenchConfig", "run_bench"),
    "gate": ("gate_tuning.recipe", "GateRecipeConfig", "run_gate"),
    "eval": ("gate_tuning.recipe", "EvalRecipeConfig", "run_eval"),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="demo", choices=sorted(RECIPES))
    parser.add_argument("--config", default=None, help="YAML file with overrides of the recipe's config defaults")
    parser.add_argument("overrides", nargs="*", help="key=value (dotted keys for nested sections)")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after --config


def setup_logging() -> None:
    """Recipes log through `logging`: show their INFO lines plainly, keep the libraries' chatter down."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL; we pin TRL
    # transformers 5.23 renamed gradient_checkpointing; its own trainers still call the old names.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()

    module_name, config_name, function_name = RECIPES[args.recipe]
    module = importlib.import_module(module_name)
    try:
        config = load_config(getattr(module, config_name), args.config, args.overrides)
    except ConfigError as err:
        print(f"run.py {args.recipe}: {err}", file=sys.stderr)
        return 2
    print(f"# run.py {args.recipe}: resolved config\n{yaml.safe_dump(to_dict(config), sort_keys=False)}")
    try:
        getattr(module, function_name)(config)
    except ConfigError as err:  # a recipe's up-front checks of paths in its config (before any model work)
        print(f"run.py {args.recipe}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
