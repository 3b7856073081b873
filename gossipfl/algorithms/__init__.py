"""Learning algorithms, each written once as pure tensor math and run by every engine.

To add one: write a module with pure batched functions (a leading node axis on every tensor) and a
small class deriving from `gossipfl.algorithms.base.AlgorithmBase` that declares its message
channels and targets (see `Algorithm` there for what an engine calls and in which order), then
list it in ``ALGORITHMS`` below. Every engine runs it unchanged; none needs an edit.

=====================  ====================================  ====================================
name                   algorithm                             hyperparameters ([algorithm_params])
=====================  ====================================  ====================================
``dpsgd``              D-PSGD (model mixing)                 -
``averaging``          pure D-PSGD averaging, no training    -
``gossip``             gossip learning, age-weighted merge   ``order``
``gossip_partitioned`` gossip learning, one part per message ``partitions``, ``seed``
``gradex``             gradient exchange + model averaging   ``average_every``
``adpsgd``             AD-PSGD pairwise atomic averaging     ``mix``
``pairwise_averaging`` randomized gossip (Boyd), no training ``mix``
``pushsum``            Stochastic Gradient Push (push-sum)   ``self_weight``
``pushsum_averaging``  pure push-sum averaging               ``self_weight``
``choco``              CHOCO-SGD, compressed gossip          ``compression``, ``fraction``, ``bits``,
                                                             ``norm``, ``gamma``, ``rescale``, ``seed``
``diging``             gradient tracking (DIGing)            ``lr``
``epidemic``           Epidemic Learning (s random peers)    ``fanout``
``exact_diffusion``    exact diffusion (D²), bias-corrected  -
``qgm``                Quasi-Global Momentum (QG-DSGDm)      ``beta``
=====================  ====================================  ====================================
"""

from __future__ import annotations

import inspect
from typing import Any

from gossipfl.algorithms.adpsgd import ADPSGD, PairwiseAveraging
from gossipfl.algorithms.base import (
    Algorithm,
    AlgorithmBase,
    Channel,
    Draws,
    Inbox,
    Learner,
    Message,
    Requirements,
    Send,
    State,
    Targets,
)
from gossipfl.algorithms.choco import CHOCO
from gossipfl.algorithms.dpsgd import DPSGD, Averaging
from gossipfl.algorithms.epidemic import EpidemicLearning
from gossipfl.algorithms.exact_diffusion import ExactDiffusion
from gossipfl.algorithms.gossip import GossipLearning, PartitionedGossip
from gossipfl.algorithms.gradex import GradientExchange
from gossipfl.algorithms.pushsum import PushSum, PushSumAveraging
from gossipfl.algorithms.qgm import QuasiGlobalMomentum
from gossipfl.algorithms.tracking import DIGing
from gossipfl.errors import ConfigError

__all__ = [
    "ALGORITHMS", "Algorithm", "AlgorithmBase", "Channel", "Draws", "Inbox", "Learner", "Message", "Requirements",
    "Send", "State", "Targets", "get_algorithm",
]

ALGORITHMS: dict[str, type] = {
    cls.name: cls
    for cls in (
        DPSGD, GossipLearning, Averaging, PartitionedGossip, GradientExchange, ADPSGD, PairwiseAveraging, PushSum,
        PushSumAveraging, CHOCO, DIGing, EpidemicLearning, ExactDiffusion, QuasiGlobalMomentum,
    )
}


def get_algorithm(name: str, **params: Any) -> Algorithm:
    """Instantiate an algorithm by name with its hyperparameters; errors name the bad value."""
    cls = ALGORITHMS.get(name)
    if cls is None:
        raise ConfigError(f"algorithm: unknown {name!r}; choose one of {', '.join(sorted(ALGORITHMS))}")
    sig = inspect.signature(cls).parameters.values()
    accepted = [p.name for p in sig if p.kind is p.KEYWORD_ONLY]
    if any(p.kind is p.VAR_KEYWORD for p in sig):  # a robust aggregator's parameters (its rule checks them)
        from gossipfl.algorithms.aggregation import RULE_PARAMS

        accepted += sorted({k for rule in RULE_PARAMS.values() for k in rule})
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"algorithm_params for {name!r}: unknown {', '.join(map(repr, unknown))}; "
            + (f"{name} takes {', '.join(accepted)}" if accepted else f"{name} takes no hyperparameters")
        )
    try:
        return cls(**params)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"algorithm_params for {name!r}: {exc}") from None
