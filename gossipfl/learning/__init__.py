"""Local learning: bundled data, partitioning, small models, flat parameters and the Trainer."""

from gossipfl.learning.data import Dataset, load_data
from gossipfl.learning.models import build_model
from gossipfl.learning.params import ParamLayout, param_layout
from gossipfl.learning.partition import partition
from gossipfl.learning.trainer import Trainer, TrainerLearner

__all__ = [
    "Dataset", "ParamLayout", "Trainer", "TrainerLearner", "build_model", "load_data", "param_layout", "partition",
]
