"""The run home: one folder that holds everything a pruning run writes.

This module must not import Prefect: the CLI calls :func:`configure_environment`
before Prefect reads its settings.
"""

from __future__ import annotations

import os
import shutil
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

    def ensure_writable(self) -> RunHome:
        """Create the home's folders, or raise one clear GlpError naming the home."""
        from glp import GlpError

        try:
            self.create()
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise GlpError(f"--home {self.root}: cannot write there ({reason}); choose a "
                           "folder you can write (--home or GLP_HOME)") from None
        return self

    def stale_temporaries(self) -> list[Path]:
        """Half-written checkpoints (``*.tmp-<pid>``) of processes that are gone; those of
        a live process (a concurrent run in this home) are not stale."""
        return [tmp for tmp in self.artifacts.glob("*/*.tmp-*") if not _owner_alive(tmp)]

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the :meth:`stale_temporaries`; returns what was deleted."""
        removed = self.stale_temporaries()
        for tmp in removed:
            shutil.rmtree(tmp, ignore_errors=True)
        return removed


def _files(path: Path) -> list[os.stat_result]:
    if path.is_file():
        return [path.stat()]
    return [f.stat() for f in path.rglob("*") if f.is_file() and not f.is_symlink()]


def folder_size(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist), a file hard-linked
    more than once under it counted once (a registered version links its checkpoint)."""
    return sum({(s.st_dev, s.st_ino): s.st_size for s in _files(path)}.values())


def freed_size(path: Path) -> int:
    """Bytes that removing ``path`` frees: a file also linked from outside it (by a
    registered version) frees nothing."""
    inside: dict[tuple[int, int], list[os.stat_result]] = {}
    for stat in _files(path):
        inside.setdefault((stat.st_dev, stat.st_ino), []).append(stat)
    return sum(links[0].st_size for links in inside.values()
               if len(links) >= links[0].st_nlink)


def collect_garbage(home: RunHome, finals: bool = False, dry_run: bool = False
                    ) -> list[tuple[Path, int]]:
    """Remove what no run of this home needs: search candidates' weights (kept only with
    ``--keep-candidates``, or by glp versions that kept them all), half-written checkpoints
    of dead processes, and the tokenisation cache (rebuilt on demand).

    With ``finals``, also the final models' checkpoints (``glp compress``'s pruned and
    compressed models and the int8 graphs included) and Prefect's cached results (a
    re-run then recomputes its fine-tunes). The MLflow store, the registered models and
    the Parquet tables are never touched. Returns (path, bytes freed) for what was (or,
    with ``dry_run``, would be) removed: a file a registered version links frees nothing.
    """
    targets = [home.artifacts / "candidates", home.token_cache]
    targets += home.stale_temporaries()
    if finals:
        targets += [home.artifacts / kind
                    for kind in ("finals", "pruned", "compressed", "int8")]
        targets.append(home.results)
    found = [(t, freed_size(t)) for t in targets if t.exists()]
    if not dry_run:
        for target, _ in found:
            shutil.rmtree(target, ignore_errors=True)
    return found


def _owner_alive(tmp: Path) -> bool:
    """Whether the process named in a ``*.tmp-<pid>`` folder is still running."""
    pid = tmp.name.rpartition(".tmp-")[2]
    return pid.isdigit() and _alive(int(pid))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def configure_environment(home: RunHome) -> None:
    """Quiet, offline-friendly settings for Prefect, MLflow and Hugging Face.

    Values the user already set win (``setdefault``). Must run before Prefect is imported.
    Creates nothing: the home is created once the inputs have been checked.
    """
    defaults = {
        "PREFECT_HOME": str(home.prefect),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # MLflow's per-file "Downloading artifacts" bars while it logs a model: noise.
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The ephemeral API can take 15-20 s to start on a small machine.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home.results),
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
