"""Layer strategies: which encoder layers to remove, searched at every depth.

Greedy layer pruning (Peer et al. 2022) and its baselines (top, bottom, random,
exhaustive) fine-tune candidates; block influence and angular distance score layers
zero-shot. Each strategy is a generator of decision records (:mod:`.search`); the flows
fine-tune, evaluate and record. Every strategy is registered as a method of family
``layers``.
"""

from glp.methods import Method, register_method
from glp.methods.layers.search import STRATEGIES

for _strategy in STRATEGIES.values():
    register_method(Method(name=_strategy.name, family="layers",
                           summary=_strategy.description,
                           followed_by=frozenset({"width", "offline"})))
