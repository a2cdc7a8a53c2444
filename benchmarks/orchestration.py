"""What the orchestration costs: ``glp prune`` against a plain library loop, as processes.

The same greedy search (MiniLM, SST-2, ``--train-limit`` examples, 1 layer removed, 1 epoch,
max length 64, lr 1e-4, 1 seed) two ways, each a whole fresh process (imports included):

- ``flow``: ``glp prune`` in a fresh run home (Prefect's ephemeral server, cached tasks,
  MLflow runs and registry, Parquet, checkpoints, ONNX registration, latency);
- ``library``: a loop over the candidates with ``glp.training.train`` (fine-tune on the fit split,
  score on the selection split, keep the best), then the unpruned and the pruned final
  models fine-tuned on the training rows and scored on dev: the same fine-tunes and
  evaluations, nothing else;
- ``library+int8``: that loop, and each final model also exported, quantised to int8 and
  scored on dev with onnxruntime, as the flow does for every final model (the work a user
  deploys); what is left between it and the flow is orchestration: Prefect, MLflow and
  its registry, Parquet, checkpoints.

The three alternate, ``--rounds`` times (A B C, then C B A, ...). Reported: each run's wall
time, the flow's as a multiple of each library loop's (medians), and each run cut into
phases where its output marks the search's progress (until the first candidate is scored,
each later candidate, the final models with their scores, after the last score until exit):
the flow's phases against ``library+int8``'s are its fixed cost and its cost per task.

``--pieces`` times the parts of the fixed cost instead, each in fresh processes, the
variants alternating: the command's Prefect API server until it answers, on a new home with
no template and on one seeded from the template (``flows/run_server.py``); a new MLflow
store, with no template and seeded from one (``tasks/templates.py``); importing the
flows; and a process that imported torch, transformers, onnxruntime, MLflow and Prefect
ending normally against ending without the interpreter's teardown (as ``glp`` does).

``--tiny`` times the tiny job (``glp prune --task rte --remove 1 --train-limit 32
--eval-limit 32 --epochs 1 --max-length 16 --seeds 1``) in new homes, as a user waits for it;
with ``--against DIR`` (another checkout of glp, e.g. a ``git worktree`` of an earlier commit)
it alternates with the same command run from there, on this Python.

Usage: PYTHONPATH=. .venv/bin/python benchmarks/orchestration.py [--train-limit 500]
       PYTHONPATH=. .venv/bin/python benchmarks/orchestration.py --pieces [--rounds 3]
       PYTHONPATH=. .venv/bin/python benchmarks/orchestration.py --tiny [--against DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIBRARY = r'''
import sys
from pathlib import Path
import torch
from transformers import AutoModelForSequenceClassification
from glp.training.config import FineTuneConfig
from glp.training.data import limit_examples, load_glue_split, split_for_selection, tokenize
from glp.core.models import load_tokenizer, resolve_model
from glp.core.surgery import remove_layers
from glp.training.train import evaluate, fine_tune

limit = int(sys.argv[1])
path = resolve_model(None)
tokenizer = load_tokenizer(path)
data = Path("data/glue")
config = FineTuneConfig(learning_rate=1e-4, batch_size=32, max_length=64, epochs=1.0)
train = limit_examples(load_glue_split("sst2", data, "train"), limit, seed=0)
fit, selection = split_for_selection(train, 0.15, seed=0)
dev = load_glue_split("sst2", data, "dev")
fit, selection, train, dev = (tokenize(d, tokenizer, max_length=64)
                              for d in (fit, selection, train, dev))

def model_without(layers):
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return remove_layers(model, layers)

scores = {}
print("search: started", flush=True)
for layer in range(6):
    model = model_without([layer])
    fine_tune(model, fit, config, seed=0)
    scores[layer] = evaluate(model, selection, is_regression=False)["accuracy"]
    print(f"candidates: {layer + 1}/6", flush=True)
best = max(scores, key=lambda k: (scores[k], -k))
raw_dev = load_glue_split("sst2", data, "dev")
for removed in ([], [best]):
    model = model_without(removed)
    fine_tune(model, train, config, seed=40)
    print(removed, evaluate(model, dev, is_regression=False)["accuracy"], flush=True)
    if sys.argv[2] == "int8":  # what the flow also does: each final model scored as int8
        import tempfile
        import numpy as np
        from glp.deploy.export import write_text_model
        from glp.deploy.text_model import TextModel
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(f"{tmp}/model")
            tokenizer.save_pretrained(f"{tmp}/model")
            write_text_model(f"{tmp}/model", f"{tmp}/int8", labels=("negative", "positive"),
                             max_length=64, int8=True)
            logits = TextModel(f"{tmp}/int8").logits(raw_dev["text_a"], None)
            print("int8", float((logits.argmax(-1) == np.asarray(raw_dev["label"])).mean()),
                  flush=True)
'''


def run(kind: str, limit: int) -> tuple[float, list[tuple[float, str]]]:
    """One run's wall time, and each line of its output with the second it arrived."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:
        if kind == "flow":
            command = [sys.executable, "-m", "flows.cli", "prune", "--task", "sst2", "--remove",
                       "1", "--train-limit", str(limit), "--epochs", "1", "--max-length", "64",
                       "--lr", "1e-4", "--seeds", "1", "--home", home]
        else:
            command = [sys.executable, "-c", LIBRARY, str(limit),
                       "int8" if kind == "library+int8" else "-"]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as process:
            lines = [(time.perf_counter() - start, line.rstrip()) for line in process.stdout]
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"{kind} failed:\n" + "\n".join(line for _, line in lines[-40:]))
    return seconds, lines


CANDIDATE_DONE = re.compile(r"candidates: ([1-9][0-9]*)/")
LAST_SCORE = {"flow": re.compile(r"int8 scores: 2/2"), "library": re.compile(r"^\[[0-9, ]*\] "),
              "library+int8": re.compile(r"^int8 ")}


def phases(kind: str, seconds: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """A run cut where its output marks the search's progress: until its first candidate
    was scored (the imports, services and data before it included), each later candidate,
    the final models with their scores, and what follows the last score until the process
    has exited (registration, the report, the exit)."""
    done = [t for t, line in lines if CANDIDATE_DONE.search(line)]
    last = [t for t, line in lines if LAST_SCORE[kind].search(line)][-1]
    return {"until the first candidate is scored": done[0],
            "each later candidate (median)": statistics.median(
                b - a for a, b in itertools.pairwise(done)),
            "the final models and their scores": last - done[-1],
            "after the last score, until exit": seconds - last}


SERVER = r'''
import os, sys, time
from flows.run_server import run_server_ready
from flows.processes import stop_process
import flows.run_server as rs
start = time.perf_counter()
run_server_ready(timeout=120)
print(time.perf_counter() - start)
stop_process(rs._run_server[0], grace=5.0, settle=0.0)
'''
STORE = r'''
import sys, time
from tasks.tracking import client_for
start = time.perf_counter()
client_for(f"sqlite:///{sys.argv[1]}/mlflow.db")
print(time.perf_counter() - start)
'''
STACK = "import torch, transformers, onnxruntime, mlflow, prefect, flows.prune, flows.compare"
TEARDOWN = {"normal exit": STACK, "no teardown": STACK + "; import os; os._exit(0)"}


def _python(code: str, *args: str, env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start, done.stdout.strip()


def pieces(rounds: int) -> dict[str, list[float]]:
    import os

    times: dict[str, list[float]] = {}
    for round_ in range(rounds):
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            for name, seeded in (("server, new home, no template", False),
                                 ("server, new home, seeded", True))[::1 - 2 * (round_ % 2)]:
                cache = root / ("cache" if seeded else f"empty-{name[-3:]}")
                if seeded:  # a template made by a first start
                    _python(SERVER, env={**os.environ, "GLP_CACHE_DIR": str(cache),
                                         "PREFECT_HOME": str(root / "first")})
                env = {**os.environ, "GLP_CACHE_DIR": str(cache),
                       "PREFECT_HOME": str(root / name.replace(" ", "-").replace(",", ""))}
                times.setdefault(name, []).append(float(_python(SERVER, env=env)[1]))
            for name, seeded in (("MLflow store, new home, no template", False),
                                 ("MLflow store, new home, seeded", True))[::1 - 2 * (round_ % 2)]:
                cache, store = root / f"mlflow-cache-{seeded}", root / f"store-{seeded}"
                store.mkdir()
                env = {**os.environ, "GLP_CACHE_DIR": str(cache)}
                if seeded:  # a template made by a first store
                    (root / "first-store").mkdir()
                    _python(STORE, str(root / "first-store"), env=env)
                times.setdefault(name, []).append(float(_python(STORE, str(store), env=env)[1]))
            times.setdefault("MLflow store, existing", []).append(
                float(_python(STORE, str(root / "store-True"))[1]))
        times.setdefault("import flows.prune", []).append(_python("import flows.prune")[0])
        for name, code in list(TEARDOWN.items())[::1 - 2 * (round_ % 2)]:
            times.setdefault(f"process: {name}", []).append(_python(code)[0])
    return times


TINY = ["prune", "--task", "rte", "--remove", "1", "--train-limit", "32", "--eval-limit", "32",
        "--epochs", "1", "--max-length", "16", "--seeds", "1"]


def tiny(rounds: int, against: Path | None) -> dict[str, list[float]]:
    """The tiny job's wall time in a new home, from this checkout and (alternating) from
    ``against``: ``python -m flows.cli`` run in a checkout imports that checkout's code."""
    checkouts = {"this checkout": Path.cwd()}
    if against is not None:
        checkouts[f"{against}"] = against.resolve()
    times: dict[str, list[float]] = {name: [] for name in checkouts}
    for round_ in range(rounds):
        for name, root in list(checkouts.items())[::1 - 2 * (round_ % 2)]:
            with tempfile.TemporaryDirectory() as home:
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "flows.cli", *TINY, "--home", home],
                                      cwd=root, capture_output=True, text=True)
                times[name].append(time.perf_counter() - start)
            if done.returncode != 0:
                raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
            print(f"round {round_ + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--pieces", action="store_true", help="time the fixed cost's parts")
    parser.add_argument("--tiny", action="store_true", help="time the tiny job in new homes")
    parser.add_argument("--against", type=Path, help="--tiny: another checkout to alternate with")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.tiny:
        times = tiny(args.rounds, args.against)
        out = args.out or Path("docs/benchmarks/orchestration_tiny.json")
        out.write_text(json.dumps({"rounds": args.rounds, "command": ["glp", *TINY],
                                   "seconds": times}, indent=1) + "\n")
        print("| checkout | seconds (each round) | median |\n| --- | --- | ---: |")
        for name, values in times.items():
            print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} | "
                  f"{statistics.median(values):.1f} |")
        return
    if args.pieces:
        times = pieces(args.rounds)
        out = args.out or Path("docs/benchmarks/orchestration_pieces.json")
        out.write_text(json.dumps({"rounds": args.rounds, "seconds": times}, indent=1) + "\n")
        print("| piece | seconds (each round) | median |\n| --- | --- | ---: |")
        for name, values in times.items():
            print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} | "
                  f"{statistics.median(values):.1f} |")
        return
    args.out = args.out or Path("docs/benchmarks/orchestration.json")
    order = ["flow", "library", "library+int8"]
    times: dict[str, list[float]] = {kind: [] for kind in order}
    cuts: dict[str, list[dict[str, float]]] = {kind: [] for kind in order}
    for round_ in range(args.rounds):
        for kind in order if round_ % 2 == 0 else order[::-1]:
            seconds, lines = run(kind, args.train_limit)
            times[kind].append(seconds)
            cuts[kind].append(phases(kind, seconds, lines))
            print(f"round {round_ + 1} {kind}: {seconds:.1f} s", flush=True)
    flow = statistics.median(times["flow"])
    ratios = {kind: flow / statistics.median(times[kind]) for kind in order[1:]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"train_limit": args.train_limit, "rounds": args.rounds,
                                    "seconds": times, "ratio": ratios["library"],
                                    "ratio_same_work": ratios["library+int8"],
                                    "phases": cuts},
                                   indent=1) + "\n")
    print("\n| run | wall time (each round) |\n| --- | --- |")
    for kind in order:
        print(f"| {kind} | " + " / ".join(f"{t:.1f} s" for t in times[kind]) + " |")
    for kind, ratio in ratios.items():
        print(f"glp prune / {kind} loop: {ratio:.2f}× (medians)")
    print("\n| phase (medians of the rounds) | flow | library+int8 | difference |\n"
          "| --- | ---: | ---: | ---: |")
    for phase in cuts["flow"][0]:
        flow_s, same_s = (statistics.median(c[phase] for c in cuts[k])
                          for k in ("flow", "library+int8"))
        print(f"| {phase} | {flow_s:.2f} s | {same_s:.2f} s | {flow_s - same_s:+.2f} s |")


if __name__ == "__main__":
    main()
