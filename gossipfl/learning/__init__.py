"""Local learning: bundled data, partitioning, small models, flat parameters and the Trainer."""

from gossipfl.learning.data import Dataset, load_data
from gossipfl.learning.models import build_model
from gossipfl.learning.params import ParamLayout, param_layout
from gossipfl.learning.partition import partition
from gossipfl.learning.trainer import Trainer

__all__ = ["Dataset", "ParamLayout", "Trainer", "build_model", "load_data", "param_layout", "partition"]
