"""MLPruning and GRAIN at their reference's settings on the full SST-2, on a GPU.

The reference protocol of both papers' code, as docs/methods.md's tables give it:

- the student starts from the pre-trained model (``init="pretrained"``), taught by that
  model fine-tuned on the task (the teacher: glp's fine-tune, lr 2e-5, batch 32, max
  length 128, ``--teacher-epochs``);
- every SST-2 training row (67,349), lr 3e-5, batch 32, max length 128;
- MLPruning: ``--epochs`` of mask training (the reference's 20), mask learning rate 0.01,
  no fine-tune after slicing; GRAIN: ``--epochs`` (20) with warm-up 0.1, weight decay
  0.01 and AdamW eps 1e-6; every other setting is the method's default (its table);
- the score is the dev accuracy of the final model: one model per method and density, no
  selection on dev (nothing is selected).

MLPruning and GRAIN run as two processes at once on the one GPU (the model is small: a
step is bound by kernel launches, not by the GPU's arithmetic). ``--budget-s`` bounds the
whole run: each method first times a few of its own steps and then trains for the
reference's epochs, or for as many whole epochs as fit in what is left of the budget (at
least half an epoch); every record says the epochs it ran. fp32 (the reference trains in
fp16; at this model's size a step costs the same, and fp32 needs no loss scaling).

Writes ``reference_settings.json`` (every number, the versions and the GPU) and
``reference_settings.md`` (the table) to ``--out``.

A GPU machine without network needs the model beside the code: ``--pack DIR`` writes the
embedded MiniLM there with fp16 weights (45 MB; the run makes an fp32 copy before loading).

Usage: python benchmarks/reference_settings.py --pack .carry/minilm
       python benchmarks/reference_settings.py --model DIR --out DIR [--device cuda]
       [--budget-s 460] [--epochs 20] [--densities 0.3] [--train-limit N] [--scratch DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from glp.core.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from glp.core.models import load_classifier, load_tokenizer  # noqa: E402
from glp.training.config import FineTuneConfig  # noqa: E402
from glp.training.data import limit_examples, load_glue_task, tokenize  # noqa: E402
from glp.training.train import evaluate, fine_tune  # noqa: E402

METHODS = ("mlpruning", "grain")
MAX_LENGTH = 128


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def fp32_copy(source: Path, target: Path) -> Path:
    """The model directory with float32 weights (a carried copy may be stored as fp16)."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.name != "model.safetensors":
            (target / item.name).write_bytes(item.read_bytes())
    weights = load_file(source / "model.safetensors")
    save_file({k: v.float().contiguous() for k, v in weights.items()},
              target / "model.safetensors", metadata={"format": "pt"})
    return target


def pack(target: Path) -> None:
    """The embedded MiniLM with fp16 weights, to carry to a machine without network."""
    from safetensors.torch import load_file, save_file

    from glp.core.models import resolve_model

    source = Path(resolve_model(None))
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and item.suffix in (".json", ".txt"):
            (target / item.name).write_bytes(item.read_bytes())
    weights = load_file(source / "model.safetensors")
    save_file({k: v.half().contiguous() for k, v in weights.items()},
              target / "model.safetensors", metadata={"format": "pt"})


def progress(label: str, every: float = 0.1):
    shown = {"next": every}
    started = time.perf_counter()

    def on_step(step: int, total: int) -> None:
        if total and step / total >= shown["next"] - 1e-9:
            log(f"{label}: {step}/{total} steps, {time.perf_counter() - started:.0f} s")
            shown["next"] += every

    return on_step, (lambda: None)


def prepare(args) -> tuple[Path, Path, dict]:
    """The fp32 pre-trained model, the tokenized splits (saved for the method processes)
    and the fine-tuned teacher, with its record."""
    work = Path(args.scratch)
    pretrained = fp32_copy(Path(args.model), work / "pretrained")
    task = load_glue_task("sst2", ROOT / "data" / "glue")
    train = limit_examples(task.train, args.train_limit) if args.train_limit else task.train
    tokenizer = load_tokenizer(pretrained)
    splits = work / "splits"
    for name, rows in (("train", train), ("dev", task.dev)):
        tokenize(rows, tokenizer, max_length=MAX_LENGTH).save_to_disk(str(splits / name))
    log(f"data: {len(train)} train rows, {len(task.dev)} dev rows")
    import datasets

    train_tok = datasets.load_from_disk(str(splits / "train"))
    dev_tok = datasets.load_from_disk(str(splits / "dev"))
    config = FineTuneConfig(learning_rate=2e-5, batch_size=32, max_length=MAX_LENGTH,
                            epochs=args.teacher_epochs)
    model = load_classifier(pretrained, num_labels=2, seed=0)
    started = time.perf_counter()
    on_step, _ = progress("teacher", 0.25)
    stats = fine_tune(model, train_tok, config, seed=0, device=args.device, on_step=on_step)
    seconds = time.perf_counter() - started
    accuracy = evaluate(model, dev_tok, is_regression=False, device=args.device)["accuracy"]
    teacher = work / "teacher"
    model.to("cpu")
    save_pretrained(model, teacher)
    load_tokenizer(pretrained).save_pretrained(teacher)
    record = {"method": "teacher", "epochs": args.teacher_epochs, "steps": stats.steps,
              "seconds": round(seconds, 1), "dev_accuracy": accuracy,
              "parameters": sum(p.numel() for p in model.parameters()), "learning_rate": 2e-5,
              "train_rows": len(train), "dev_rows": len(task.dev)}
    (Path(args.out) / "teacher.json").write_text(json.dumps(record, indent=1))
    log(f"teacher: dev accuracy {accuracy:.4f}, {stats.steps} steps in {seconds:.0f} s")
    return pretrained, work, record


def method_params(name: str, density: float, epochs: float):
    from glp.methods import get_method

    spec = get_method(name)
    if name == "mlpruning":
        values = {"density": density, "init": "pretrained", "pruning_epochs": epochs,
                  "mask_lr": 0.01, "final_epochs": 0.0}
    else:
        values = {"density": density, "init": "pretrained", "pruning_epochs": epochs}
    return spec.make_params(values)


def run_method(args) -> None:
    """One method at one density (a child process): time a few steps, then the real run."""
    import dataclasses

    import datasets

    from glp.methods import Context, get_method

    work = Path(args.work)
    train = datasets.load_from_disk(str(work / "splits" / "train"))
    dev = datasets.load_from_disk(str(work / "splits" / "dev"))
    config = FineTuneConfig(learning_rate=3e-5, batch_size=32, max_length=MAX_LENGTH,
                            epochs=1.0)
    spec = get_method(args.job)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)

    def context(label: str) -> Context:
        teacher = load_pretrained(work / "teacher")
        return Context(
            model=teacher.to(args.device), config=config, seed=40, device=args.device,
            teacher=lambda: load_pretrained(work / "teacher"),
            pretrained=lambda: load_classifier(work / "pretrained", num_labels=2, seed=40),
            load_train=lambda: train, progress=lambda what: progress(f"{label}: {what}"))

    def one(epochs: float, label: str):
        started = time.perf_counter()
        outcome = spec.implementation()(context(label), method_params(args.job, args.density,
                                                                     epochs))
        return outcome, time.perf_counter() - started

    calibration, _ = one(args.timing_steps / steps_per_epoch, "timing")
    del calibration.model
    trained = [p for p in calibration.phases if p.get("examples") is not None]
    per_step = sum(p["seconds"] for p in trained) / max(1, sum(p["steps"] for p in trained))
    left = args.deadline - time.time() - 30  # evaluation, saving and exit
    fits = 0.9 * left / (per_step * steps_per_epoch)  # a margin for slower steps
    epochs = min(args.epochs, max(0.5, math.floor(fits * 2) / 2 if fits < 1 else
                                  math.floor(fits)))
    log(f"{args.job} {args.density}: {per_step * 1000:.1f} ms a step, {left:.0f} s left, "
        f"{fits:.2f} epochs fit; training {epochs:g} of the reference's {args.epochs:g}")
    outcome, seconds = one(epochs, "run")
    model = outcome.model
    accuracy = evaluate(model, dev, is_regression=False, device=args.device)["accuracy"]
    encoder = [p.numel() for n, p in model.named_parameters() if ".layer." in n]
    record = {
        "method": args.job, "density": args.density, "epochs": epochs,
        "reference_epochs": args.epochs, "learning_rate": config.learning_rate,
        "steps": sum(int(p["steps"]) for p in outcome.phases
                     if p.get("examples") is not None),
        "seconds": round(seconds, 1), "ms_per_step": round(per_step * 1000, 2),
        "dev_accuracy": accuracy, "diverged": outcome.diverged,
        "parameters": sum(p.numel() for p in model.parameters()),
        "encoder_parameters": sum(encoder),
        "params": {k: v for k, v in dataclasses.asdict(
            method_params(args.job, args.density, epochs)).items()},
        "details": outcome.details,
    }
    out = Path(args.out) / f"{args.job}-{args.density}.json"  # comes back even if the run stops
    out.write_text(json.dumps(record, indent=1, default=str))
    log(f"{args.job} {args.density}: dev accuracy {accuracy:.4f} after {epochs:g} epochs "
        f"({seconds:.0f} s)")


def table(records: list[dict]) -> str:
    lines = ["| model | density | epochs | steps | dev accuracy | parameters | "
             "encoder parameters | ms a step | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        lines.append(
            f"| {r['method']} | {r.get('density', '')} | {r['epochs']:g} | {r['steps']} | "
            f"{r['dev_accuracy']:.4f} | {r['parameters']:,} | "
            f"{r.get('encoder_parameters', '') and format(r['encoder_parameters'], ',')} | "
            f"{r.get('ms_per_step', '')} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="the pre-trained model's directory")
    parser.add_argument("--out")
    parser.add_argument("--pack", help="write the embedded MiniLM as fp16 to this folder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=460.0)
    parser.add_argument("--epochs", type=float, default=20.0,
                        help="the reference's epochs (fewer when they do not fit)")
    parser.add_argument("--teacher-epochs", type=float, default=2.0)
    parser.add_argument("--densities", default="0.3", help="comma-separated")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--scratch", default="/tmp/glp-reference-settings",
                        help="the models and splits the processes share")
    parser.add_argument("--timing-steps", type=int, default=40,
                        help="steps each method times before its run")
    parser.add_argument("--job", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--density", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pack:
        pack(Path(args.pack))
        return 0
    if not (args.model and args.out):
        parser.error("--model and --out are required (or --pack DIR)")
    if args.job:
        run_method(args)
        return 0
    deadline = time.time() + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available()
                else "cpu", "cpus": os.cpu_count()}
    log("versions:", versions)
    pretrained, work, teacher = prepare(args)
    jobs = [(name, float(d)) for d in args.densities.split(",") for name in METHODS]
    children = [subprocess.Popen([sys.executable, __file__, "--model", args.model, "--out",
                                  args.out, "--device", args.device, "--job", name,
                                  "--density", str(density), "--work", str(work),
                                  "--scratch", args.scratch,
                                  "--timing-steps", str(args.timing_steps),
                                  "--epochs", str(args.epochs), "--deadline", str(deadline)])
                for name, density in jobs]
    codes = [child.wait() for child in children]
    records = [teacher]
    for (name, density), code in zip(jobs, codes, strict=True):
        path = Path(args.out) / f"{name}-{density}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
        else:
            log(f"{name} {density}: no result (exit {code})")
    summary = {"versions": versions, "budget_s": args.budget_s, "records": records}
    (out / "reference_settings.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "reference_settings.md").write_text(table(records))
    print(table(records))
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
