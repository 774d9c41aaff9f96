"""Training: config schema, mesh, data, engines, checkpoints, metrics, and the trainer.

cfg = validate_config(load_config("configs/tiny.yaml", ["parallel.sp=2"]), world_size)
history = Trainer(cfg).fit()
"""

from distseq.train.config import Config, config_to_yaml, load_config, validate_config
from distseq.train.mesh import launched_world_size
from distseq.train.trainer import Trainer

__all__ = [
    "Config",
    "Trainer",
    "config_to_yaml",
    "launched_world_size",
    "load_config",
    "validate_config",
]
