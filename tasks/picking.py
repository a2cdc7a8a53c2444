"""The I/O of ``glp pick``: a run home's final rows in, a registry alias out.

The choice itself is pure (:func:`glp.report.pick.choose`); this module reads what it
chooses from and moves the alias the user asked for.
"""

from __future__ import annotations

from glp import GlpError
from glp.report.pick import Model
from tasks.home import RunHome


def read_finals(home: RunHome) -> list[dict]:
    """Every row of the run home's ``parquet/finals``, in the current schema (a home
    written by an older glp has its newer columns as nulls).

    Raises GlpError when the home holds no final models.
    """
    folder = home.parquet / "finals"
    if not folder.is_dir():
        raise GlpError(f"--home {home.root}: no final models there (no parquet/finals); run "
                       "glp prune, compare or compress first")
    import pyarrow.dataset as ds

    from tasks.records import FINALS

    return ds.dataset(folder, schema=FINALS).to_table().to_pylist()


def point_alias(home: RunHome, model: Model, alias: str) -> str:
    """Point ``alias`` of the model's registered name at its version; what was done, in
    words.

    Raises GlpError when the model was not registered.
    """
    uri = model.uri or ""
    if not uri.startswith("models:/"):
        raise GlpError(f"--alias {alias}: the chosen model was not registered in "
                       f"{model.precision} (its job ran with --no-register, or before glp "
                       "registered int8 versions); register it, or load it from its "
                       "directory")
    from tasks.tracking import client_for

    version = uri.rsplit("/", 1)[1]
    client_for(home.tracking_uri).set_registered_model_alias(model.registered_model, alias,
                                                             version)
    return (f"alias @{alias} of {model.registered_model} now points at version {version} "
            f"({model.deployment})")
