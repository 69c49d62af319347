"""Command-line wiring: the code only `run.py` needs (the demo; init/rollout/parity), kept out of the
libraries (`looplm`, `rollout`, `posttrain`, `rewards`, `gate_tuning`) so that those read as libraries."""
