"""The inputs a config names (model folders, hub names), checked before any model work, for every recipe.

A missing local folder is a `UserError` that names the command which makes it; it is never sent to the hub
(transformers would answer with a hub-connection traceback). A hub name that cannot be loaded says so in one
line (`hub_errors`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from configs import UserError

# Where `python run.py` (the demo) writes its stages; the tiny configs start from these folders.
DEMO_OUTPUT_DIR = "outputs/demo"

# A hub repo id: "name" or "namespace/name" (huggingface_hub's own rule, less the length limit).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_like_hub_name(path: str) -> bool:
    """Could `path` be a hub repo id? Not when it is absolute, relative (./), deeper than one slash, or its
    first part is a local folder (outputs/x with outputs/ present is a local path)."""
    return bool(_HUB_ID.match(path)) and not (path.count("/") and Path(path.split("/")[0]).is_dir())


def make_hint(path: str | Path) -> str:
    """The command that creates a model folder at `path`."""
    if Path(path).as_posix().startswith(DEMO_OUTPUT_DIR + "/"):
        return f"`python run.py` (the CPU demo, about 6 minutes) writes it under {DEMO_OUTPUT_DIR}/"
    return f"To create a random tiny model there: python run.py init --config configs/init_tiny.yaml output={path}"


def model_folder(path: str | None, key: str = "model") -> Path:
    """An existing local model folder (a config.json in it); else a UserError saying how to make one."""
    folder = Path(path or "")
    if not path or not (folder / "config.json").is_file():
        what = "no such folder" if not path or not folder.exists() else "no config.json in it"
        raise UserError(
            f"{key}: {path or '(empty)'}: {what} (expected a LoopLM or Ouro checkpoint folder). {make_hint(folder)}"
        )
    return folder


def model_source(path: str, key: str = "model.path") -> str:
    """`path` if it is a local model folder or could be a hub name (loaded under `hub_errors`); a missing
    local folder is a UserError naming the command that makes it."""
    if Path(path).exists() or not looks_like_hub_name(path):
        model_folder(path, key)
    return path


@contextlib.contextmanager
def hub_errors(key: str, name: str | None) -> Iterator[None]:
    """Around a `from_pretrained` / `load_dataset` of `name`: a hub name that cannot be loaded (no network,
    unknown repo) becomes a one-line UserError. Errors reading a local path pass through."""
    try:
        yield
    except OSError as err:
        if name is None or Path(name).exists():
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}: {name!r} is not a local folder, and loading it from the Hugging Face hub failed: "
                        f"{reason}") from err


__all__ = ["DEMO_OUTPUT_DIR", "hub_errors", "looks_like_hub_name", "make_hint", "model_folder", "model_source"]
