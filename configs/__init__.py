"""One YAML per recipe and scale (this folder), and the loader that reads them (`configs.loader`).

The loader's names are re-exported here, so `from configs import UserError, load_config` keeps working;
`configs.inputs` holds the checks of user-given inputs (model folders, hub names).
"""

from configs.loader import (
    CONFIG_DIR,
    ConfigError,
    UserError,
    describe,
    describe_training_args,
    from_dict,
    load_config,
    save_config,
    to_dict,
)

__all__ = [
    "CONFIG_DIR", "ConfigError", "UserError", "describe", "describe_training_args", "from_dict", "load_config",
    "save_config", "to_dict",
]
