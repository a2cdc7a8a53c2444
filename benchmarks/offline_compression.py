"""SVD against the autoencoder (and Fisher-weighted SVD) at equal compression ratio, with no
fine-tuning: the claim of Banaei et al. (2023), checked on a fine-tuned model.

For each module type (and all encoder types together) and each ratio, every method
compresses the same fine-tuned model with no fine-tuning (the autoencoder's
``--ae-finetune-epochs 0`` variant; its epoch is chosen by reconstruction loss); the dev
and selection metrics, parameters and stored bytes are recorded, one JSON line per result
(appended, so an interrupted run keeps what it finished). With
``--latency`` the "all" models are timed at batch 32, interleaved with the input model.

    PYTHONPATH=. .venv/bin/python benchmarks/offline_compression.py TEACHER_DIR \
        --task sst2 --train-limit 2000 --max-length 64 --out results.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from glp.core.checkpoint import (
    CODES_ATTR,
    load_pretrained,
    save_pretrained,
    saved_parameters,
    stored_bytes,
)
from glp.core.plan import EMBEDDINGS, ROLES, plan_of_model
from glp.core.surgery import apply_plan
from glp.methods.autoencoder.compress import AutoencoderConfig, fold_linear, train_autoencoder
from glp.methods.lowrank.svd import fisher_factors, fisher_information, ranks_for_ratio
from glp.training.metrics import selection_score
from glp.training.train import evaluate
from tasks.data import DataSource, prepare_data
from tasks.home import RunHome
from tasks.training import _tokenizer, tokenized

SETS = {**{r: (r,) for r in (*ROLES, EMBEDDINGS)}, "all": ROLES}
METHODS = ("svd", "fisher-svd", "ae-linear", "ae-nonlinear")


def scores(model, data, dev, selection):
    out = {}
    for name, ds in (("dev", dev), ("selection", selection)):
        metrics = evaluate(model, ds, is_regression=data.is_regression, batch_size=128)
        out[name] = selection_score(metrics, data.metric)
    return out


def compress(teacher, method, roles, ratio, fisher, epochs):
    model = copy.deepcopy(teacher)
    base = plan_of_model(model)
    if method in ("svd", "fisher-svd"):
        ranks = ranks_for_ratio(model, roles, ratio)
        factor = fisher_factors(fisher) if method == "fisher-svd" else "svd"
        apply_plan(model, base.offline(ranks), factor)
        return model, {}
    decoder = method.partition("-")[2]
    config = AutoencoderConfig(ratio=ratio, decoder=decoder, epochs=epochs)
    ranks, shared, coded, codes, info = {}, [], {}, {}, {}

    for role in roles:
        result = train_autoencoder(model, role, config)
        info[role] = {"latent": result.latent, "best_epoch": result.best_epoch,
                      "loss": round(result.losses[result.best_epoch - 1], 4),
                      "seconds": round(result.seconds, 1)}
        if decoder == "linear":
            ranks.update(fold_linear(model, result))
            if role != EMBEDDINGS:
                shared.append(role)
        else:
            coded[role] = {"latent": result.latent, "hidden": result.hidden}
            codes[role] = result
    setattr(model, CODES_ATTR, codes)
    model.glp_plan = base.offline(ranks, shared, coded)
    return model, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default="data/glue")
    parser.add_argument("--train-limit", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--ratios", type=float, nargs="+", default=[10.0, 4.0, 20.0])
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--home", default="/tmp/glp-offline-bench")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)

    home = RunHome.resolve(args.home).create()
    data = prepare_data.fn(DataSource(task=args.task, data_dir=args.data_dir), home,
                           args.train_limit, None, 0.15, 0)
    dev, _ = tokenized(data, "dev", args.teacher, args.max_length, home)
    selection, _ = tokenized(data, "selection", args.teacher, args.max_length, home)
    teacher = load_pretrained(args.teacher)
    out = Path(args.out)
    base = {"teacher": args.teacher, "task": data.task, "metric": data.metric,
            "ae_epochs": args.epochs,
            "selection_examples": data.sizes["selection"], "dev_examples": data.sizes["dev"]}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(teacher, Path(tmp) / "t", _tokenizer(args.teacher))
        input_row = {**base, "method": "input", "set": "none", "ratio": 1.0,
                     **scores(teacher, data, dev, selection),
                     "parameters": sum(p.numel() for p in teacher.parameters()),
                     "stored_bytes": stored_bytes(Path(tmp) / "t")}
    with out.open("a") as handle:
        handle.write(json.dumps(input_row) + "\n")
    print(input_row, flush=True)
    fisher = None
    if "fisher-svd" in args.methods:
        started = time.perf_counter()
        keys = list(ranks_for_ratio(teacher, (*ROLES, EMBEDDINGS), 2))
        fisher = fisher_information(teacher, selection, keys, batch_size=32)
        print(f"Fisher information: {time.perf_counter() - started:.1f} s", flush=True)
    timed = {}
    for ratio in args.ratios:
        for name in args.sets:
            for method in args.methods:
                started = time.perf_counter()
                try:
                    model, info = compress(teacher, method, SETS[name], ratio, fisher,
                                           args.epochs)
                except Exception as exc:  # noqa: BLE001 - a ratio too high for a set
                    print(f"skip {method} {name} {ratio:g}: {exc}", flush=True)
                    continue
                seconds = time.perf_counter() - started
                with tempfile.TemporaryDirectory() as tmp:
                    save_pretrained(model, Path(tmp) / "m", _tokenizer(args.teacher))
                    stored = stored_bytes(Path(tmp) / "m")
                    stored_params = saved_parameters(Path(tmp) / "m")
                    reloaded = load_pretrained(Path(tmp) / "m")
                row = {**base, "method": method, "set": name, "ratio": ratio,
                       **scores(reloaded, data, dev, selection),
                       "parameters": sum(p.numel() for p in reloaded.parameters()),
                       "stored_parameters": stored_params, "stored_bytes": stored,
                       "seconds": round(seconds, 1), "info": info}
                if args.latency and name == "all":
                    timed[f"{method}-{ratio:g}"] = reloaded
                with out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print({k: v for k, v in row.items() if k != "teacher"}, flush=True)
    if timed:
        from glp.deploy.bench import latency_batch, measure_latency

        batch = latency_batch(dev, batch_size=32, pad_id=teacher.config.pad_token_id or 0)
        measured = measure_latency({"input": teacher, **timed}, batch, repeats=20)
        with out.open("a") as handle:
            for key, value in measured.items():
                line = {**base, "latency": key, "median_ms": value.median_ms,
                        "p90_ms": getattr(value, "p90_ms", None), "batch": 32}
                handle.write(json.dumps(line) + "\n")
                print(line, flush=True)


if __name__ == "__main__":
    main()
