"""The run home: one folder that holds everything a pruning run writes.

This module must not import Prefect: the CLI calls :func:`configure_environment`
before Prefect reads its settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = ".glp"


@dataclass(frozen=True)
class RunHome:
    """The layout under ``GLP_HOME`` (default ``./.glp``)."""

    root: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None) -> RunHome:
        """``home``, else ``$GLP_HOME``, else ``./.glp``, as an absolute path."""
        chosen = home or os.environ.get("GLP_HOME") or DEFAULT_HOME
        return cls(Path(chosen).expanduser().resolve())

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def token_cache(self) -> Path:
        return self.root / "cache" / "tokens"

    @property
    def parquet(self) -> Path:
        return self.root / "parquet"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    @property
    def results(self) -> Path:
        """Prefect's persisted task results: the cache that makes re-runs cheap."""
        return self.root / "prefect" / "results"

    @property
    def reports(self) -> Path:
        """Comparison reports: markdown, CSV and PNG plots, one folder per job."""
        return self.root / "reports"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlruns"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    def create(self) -> RunHome:
        for path in (self.root, self.artifacts, self.data, self.token_cache, self.parquet,
                     self.results, self.mlflow_artifacts):
            path.mkdir(parents=True, exist_ok=True)
        return self


def configure_environment(home: RunHome) -> None:
    """Quiet, offline-friendly settings for Prefect, MLflow and Hugging Face.

    Values the user already set win (``setdefault``). Must run before Prefect is imported.
    """
    home.create()
    defaults = {
        "PREFECT_HOME": str(home.prefect),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The ephemeral API can take 15-20 s to start on a small machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home.results),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
