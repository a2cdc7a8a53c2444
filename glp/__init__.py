"""glp: Greedy Layer Pruning for transformer encoders.

The library (this package) is pure Python + torch/transformers/datasets; it imports
neither Prefect nor MLflow, so it can be used from a notebook, a test or another
orchestrator. The Prefect tasks and flows live in the top-level ``tasks`` and
``flows`` packages.
"""

__version__ = "0.1.0"


class GlpError(ValueError):
    """A user-facing error: bad input, named with what would be valid.

    The CLI prints these as one red line and exits non-zero, without a traceback.
    """


def load_pretrained(directory, **kwargs):
    """Load a model saved by glp (any plan: layers, heads, neurons, blocks).

    See :func:`glp.checkpoint.load_pretrained`; imported lazily (torch takes seconds).
    """
    from glp.checkpoint import load_pretrained as load

    return load(directory, **kwargs)
