"""Per-candidate overhead: a search candidate's wall time minus its training loop and its
predict, for 6 MiniLM candidates on the demo's SST-2 split (2 training steps each, so that
the overhead is most of the wall time).

    PYTHONPATH=. .venv/bin/python benchmarks/candidate_overhead.py

Run from the checkout to measure (PYTHONPATH=. makes it import that checkout's code). It
also runs on checkouts from before candidates were scored in one task: it then times
their fine-tune task and evaluation task.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import glp.training.train as train
import tasks.training as training
from flows.params import PruneParams
from glp.core.models import model_fingerprint, resolve_model
from glp.training.config import FineTuneConfig
from tasks.data import prepare_data
from tasks.home import RunHome


def main() -> None:
    params = PruneParams(train_limit=2000, epochs=1.0, max_length=64, learning_rate=1e-4,
                         seeds=1)
    home = RunHome(Path(tempfile.mkdtemp())).create()
    data = prepare_data.fn(params.source(), home, 2000, None, 0.15, 0)
    model_path = resolve_model(params.model)
    fingerprint = model_fingerprint(model_path)
    config = FineTuneConfig(learning_rate=1e-4, batch_size=32, max_length=64,
                            epochs=64 / 1700)
    inner = {"train": 0.0, "predict": 0.0}
    real_fine_tune, real_predict = train.fine_tune, train.predict

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                inner[name] += time.perf_counter() - start
        return wrapper

    train.predict = timed("predict", real_predict)
    training.fine_tune = timed("train", real_fine_tune)
    one_task = hasattr(training, "run_candidate")
    overheads = []
    for layer in range(6):
        inner.update(train=0.0, predict=0.0)
        extra = {"keep_weights": False} if one_task else {}
        request = training.FineTuneRequest(
            model_path=model_path, model_fingerprint=fingerprint, data=data, split="fit",
            removed=(layer,), config=config, seed=41, home=home, **extra)
        start = time.perf_counter()
        if one_task:
            training.run_candidate(request, "selection")
        else:
            checkpoint = training.run_fine_tune(request, "candidates")
            training.run_evaluation(checkpoint, data, "selection", config, home)
        wall = time.perf_counter() - start
        overheads.append(wall - inner["train"] - inner["predict"])
        print(f"candidate {layer}: wall {wall:.2f} s, training {inner['train']:.2f} s, "
              f"predict {inner['predict']:.2f} s, overhead {overheads[-1]:.2f} s", flush=True)
    print(f"overhead: first {overheads[0]:.2f} s, then median "
          f"{statistics.median(overheads[1:]):.2f} s per candidate")
    size = subprocess.run(["du", "-sh", str(home.root)], capture_output=True, text=True)
    print(f"home: {size.stdout.split()[0]}")


if __name__ == "__main__":
    main()
