"""glp: structured compression of fine-tuned transformer encoders for one task.

The library (this package) is pure Python + torch/transformers/datasets; it imports
neither Prefect nor MLflow, so it can be used from a notebook, a test or another
orchestrator. Its subpackages, each importing only those below it:

- ``glp.report``   tables and plots of results, readable in 80 columns; choosing a model;
- ``glp.methods``  one module per compression method and the registry that names them;
- ``glp.deploy``   ONNX export and latency measurement;
- ``glp.training`` the fine-tune loop, data, metrics;
- ``glp.core``     plans, surgery (applying a plan), checkpoints, model loading, errors.

The Prefect tasks and flows live in the top-level ``tasks`` and ``flows`` packages.
"""

from glp.core.errors import GlpError

__version__ = "0.1.0"
__all__ = ["GlpError", "load_pretrained"]


def load_pretrained(directory, **kwargs):
    """Load a model saved by glp (any plan: layers, heads, neurons, blocks, ranks, codes).

    See :func:`glp.core.checkpoint.load_pretrained`; imported lazily (torch takes seconds).
    """
    from glp.core.checkpoint import load_pretrained as load

    return load(directory, **kwargs)
