"""LoopRL's one command-line entry.

    python run.py                                   # the small CPU end-to-end demo
    python run.py <recipe> [--config FILE] [key=value ...]
    python run.py [<recipe>] --help                 # the recipes' keys, types and defaults
    python run.py demo fresh=true                   # keys are key=value; e.g. the demo, started over

Each recipe is a `*Config` dataclass and a function taking it; the YAML file and the overrides only change
the dataclass defaults (unknown keys fail with the key named). The terminal gets a few lines of the resolved
config (`--print-config`: all of it); recipes save it whole beside their outputs. A mistake in what was given
(config, data, paths, values) is one line and exit status 2; `--traceback` (or LOOPRL_TRACEBACK=1) also shows
where it was raised. Any other error is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import logging
import os
import sys
import warnings

import yaml

from configs import ConfigError, UserError, describe, describe_training_args, load_config, to_dict

logger = logging.getLogger("run")

# recipe name -> (module, config class, function); imported lazily so that one recipe's imports
# (Ray, TRL, vLLM) cost nothing to the others.
RECIPES: dict[str, tuple[str, str, str]] = {
    "demo": ("cli.demo", "DemoConfig", "run_demo"),
    "init": ("cli.init", "InitConfig", "run_init"),
    "sft": ("posttrain.sft_recipe", "SFTRecipeConfig", "run_sft"),
    "grpo": ("posttrain.grpo_recipe", "GRPORecipeConfig", "run_grpo"),
    "rollout": ("cli.rollout", "RolloutRecipeConfig", "run_rollout"),
    "parity": ("cli.parity", "ParityRecipeConfig", "run_parity"),
    "bench": ("bench.run", "BenchConfig", "run_bench"),
    "gate": ("gate_tuning.recipe", "GateRecipeConfig", "run_gate"),
    "eval": ("gate_tuning.recipe", "EvalRecipeConfig", "run_eval"),
}

SUMMARIES = {
    "demo": "SFT -> GRPO through Ray actors -> Stage-II gate on a tiny LoopLM, on CPU, with a report",
    "init": "a random LoopLM of a looplm.tiny size, saved as a model folder",
    "sft": "reasoning SFT (TRL's SFTTrainer) with a loop-aware objective (final, Stage I, mean over loops)",
    "grpo": "RLVR (GRPO/DAPO, TRL's GRPOTrainer) with rollouts the update replays exactly",
    "rollout": "a model folder + prompts -> JSONL of rollout records (our engine, the Ray pool or vLLM)",
    "parity": "generate, replay with the training forward, report the log-prob gap and KL per depth policy",
    "bench": "benchmarks by name, each against its baseline in the same run (BENCHMARKS.md)",
    "gate": "Stage-II exit-gate tuning with the LM frozen, and the depth/accuracy frontier",
    "eval": "the depth/accuracy frontier of a model folder, without training",
}


# The resolved config's keys shown on the terminal (where present); the rest is saved with the outputs.
SUMMARY_KEYS = ("model.path", "model", "data.train", "training.max_steps", "training.output_dir", "output_dir", "output")


class UsageError(ValueError):
    """A recipe name or option that run.py does not know."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """-> recipe (default demo), config, overrides and the flags. The first word is the recipe unless it is a
    key=value; `help` is --help."""
    parser = argparse.ArgumentParser(prog="run.py", add_help=False)
    parser.add_argument("--config", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    parser.add_argument("--print-config", action="store_true")
    parser.add_argument("--traceback", action="store_true")
    parser.add_argument("words", nargs="*")
    try:
        args, unknown = parser.parse_known_intermixed_args(argv)  # overrides may come before or after --config
    except SystemExit:  # argparse has printed the problem (e.g. --config without a file)
        raise UsageError("run.py --help lists the recipes and their keys") from None
    words = list(args.words)
    if words[:1] == ["help"]:
        words, args.help = words[1:], True
    recipe = words.pop(0) if words and "=" not in words[0] else "demo"
    if recipe not in RECIPES:
        close = difflib.get_close_matches(recipe, list(RECIPES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown recipe {recipe!r}{hint}; recipes: {', '.join(RECIPES)}")
    if unknown:
        raise UsageError(_option_hint(unknown[0], recipe))
    return argparse.Namespace(recipe=recipe, config=args.config, overrides=words, help=args.help,
                              print_config=args.print_config, traceback=args.traceback)


def _option_hint(option: str, recipe: str) -> str:
    """`--fresh` or `--model.path=x`: a recipe key given as an option; point to its key=value form."""
    key, sep, value = option.lstrip("-").partition("=")
    return (f"{option} is not an option (those are --config, --help, --print-config, --traceback); a recipe's keys "
            f"go as key=value: python run.py {recipe} {key}={value if sep else 'true'}   (run.py {recipe} --help lists them)")


def config_class(recipe: str) -> type:
    module_name, config_name, _ = RECIPES[recipe]
    return getattr(importlib.import_module(module_name), config_name)


def recipe_help(recipe: str, full: bool = True) -> str:
    """The recipe's summary and its keys (type = default), from its config dataclass. `full`: also every
    option of a TRL section (else one line naming its class)."""
    cls = config_class(recipe)
    lines = [f"{recipe}: {SUMMARIES[recipe]}", f"  python run.py {recipe} [--config FILE] [key=value ...]"]
    for key, type_text, default in describe(cls):
        if default is dataclasses.MISSING:  # a TrainingArguments section: TRL's own options
            lines.append(f"  {key}.*: every option of {type_text} (a TrainingArguments class: its own names, defaults and checks)")
            if full:
                section = getattr(cls(), key)
                lines += [f"    {key}.{k}: {t} = {_show(d)}" for k, t, d in describe_training_args(type(section), section)]
            continue
        lines.append(f"  {key}: {type_text} = {_show(default)}")
    return "\n".join(lines)


def overview() -> str:
    parts = [__doc__.strip(), "", "Recipes and their keys (`run.py <recipe> --help` also lists TRL's options):"]
    for recipe in RECIPES:
        parts += ["", recipe_help(recipe, full=False)]
    return "\n".join(parts)


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def setup_logging() -> None:
    """Recipes log through `logging`: show their INFO lines plainly, keep the libraries' chatter down."""
    # Under torchrun / accelerate launch only the main process (RANK 0) tells the story; the others warn.
    main_process = int(os.environ.get("RANK", "0")) == 0
    # force: the handler writes to the sys.stderr of this call (a second main() in one process, as in tests)
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # huggingface_hub's retry warnings for an unreachable hub: our one line says so (configs.inputs.hub_errors).
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    # Ray sets its "ray" logger back to INFO when imported; levels on its child loggers stay. Hidden: the
    # "Started a local Ray instance" line, and the warning at every local ray.init that token auth is on by
    # default (the pool keeps that default).
    logging.getLogger("ray._private.worker").setLevel(logging.WARNING)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL; we pin TRL
    # transformers 5.23 renamed gradient_checkpointing; its own trainers still call the old names.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"run.py: {err}", file=sys.stderr)
        return 2
    setup_logging()
    if args.help:
        print(recipe_help(args.recipe) if args.recipe != "demo" or argv_names_recipe(argv) else overview())
        return 0

    module_name, config_name, function_name = RECIPES[args.recipe]
    module = importlib.import_module(module_name)
    show_traceback = args.traceback or os.environ.get("LOOPRL_TRACEBACK", "") not in ("", "0")
    try:
        config = load_config(getattr(module, config_name), args.config, args.overrides)
        if args.print_config:
            logger.info("# run.py %s: resolved config\n%s", args.recipe, yaml.safe_dump(to_dict(config), sort_keys=False))
        else:
            logger.info("%s", config_summary(args, config))
        getattr(module, function_name)(config)
    except UserError as err:  # what the user gave, not the program: one line
        if show_traceback:
            raise
        keys = f" (`run.py {args.recipe} --help` lists its keys)" if isinstance(err, ConfigError) else ""
        print(f"run.py {args.recipe}: {one_line(err)}{keys}", file=sys.stderr)
        return 2
    return 0


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def config_summary(args: argparse.Namespace, config: object) -> str:
    """A few lines: where the config came from and its main keys (the whole of it is saved with the outputs)."""
    source = args.config or "defaults"
    if args.overrides:
        source += f" + {len(args.overrides)} override(s)"
    flat = _flatten(to_dict(config))
    keys = "  ".join(f"{k}={_show(flat[k])}" for k in SUMMARY_KEYS if k in flat)
    return (f"# run.py {args.recipe}: {source}\n#   {keys}\n"
            f"#   the full resolved config is saved with the outputs; --print-config prints it here")


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def argv_names_recipe(argv: list[str] | None) -> bool:
    words = [w for w in (sys.argv[1:] if argv is None else argv) if not w.startswith("-")]
    return bool(words) and words[0] in RECIPES


if __name__ == "__main__":
    sys.exit(main())
