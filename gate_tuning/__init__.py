"""Stage II of an Ouro-style LoopLM: tune the exit gate with the LM frozen, and measure depth against accuracy.

    stage2.py    per-loop improvements, continue targets, the Stage-II loss, `GateTrainer` (transformers)
    frontier.py  every exit rule on held-out data (loss, accuracy, loops, K/V bytes), picking q, csv/md/png
    data.py      prompt / reference-completion / answer examples from the SFT data formats
    recipe.py    `run.py gate` and `run.py eval` and their configs
"""
