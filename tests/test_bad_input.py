"""Every kind of bad input a new user tried, through the CLI.

Each is refused before anything runs: exit code 2, exactly one line on stderr (not
wrapped, however long), no home folder created for a new home, and an existing home's
tables, registry and files left exactly as they were. The checks run in this process
(the same code path as the console script, in milliseconds); one test runs the real
command in a subprocess with a narrow terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parent.parent
TINY = ["--task", "sst2", "--remove", "1", "--train-limit", "40", "--eval-limit", "20",
        "--epochs", "1", "--max-length", "16", "--batch-size", "16", "--seeds", "1"]


def _subprocess(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # A narrow terminal width: an error line must still not wrap.
    env = {**os.environ, "COLUMNS": "60", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("GLP_HOME", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _glp(*args: str) -> SimpleNamespace:
    result = CliRunner().invoke(app, list(args), env={"GLP_HOME": None})
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout,
                           stderr=result.stderr)


def _snapshot(home: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(home)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(home.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_home(tiny_bert, tmp_path_factory) -> Path:
    """A home that holds one finished run: tables, registry, checkpoints."""
    home = tmp_path_factory.mktemp("existing") / "home"
    done = _subprocess("prune", "--model", str(tiny_bert), *TINY, "--home", str(home))
    assert done.returncode == 0, done.stdout + done.stderr
    return home


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    """Data files and models with one thing wrong each."""
    root = tmp_path_factory.mktemp("bad")
    good = pd.DataFrame({"text": [f"good film {i}" for i in range(10)]
                         + [f"bad film {i}" for i in range(10)], "label": [1] * 10 + [0] * 10})
    out = {}

    def csv(name: str, frame: pd.DataFrame) -> None:
        out[name] = root / f"{name}.csv"
        frame.to_csv(out[name], index=False)

    csv("train", good)
    csv("one_class", good.assign(label=1))
    csv("dev_new_label", pd.concat([good, pd.DataFrame({"text": ["meh"], "label": [2]})]))
    regression = good.assign(label=[0.5 * i for i in range(20)])
    csv("regression", regression)
    nan = regression.astype({"label": object})
    nan.loc[3, "label"] = "NaN"
    csv("regression_nan", nan)

    truncated = root / "truncated-model"
    shutil.copytree(tiny_bert, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out["truncated"] = truncated

    custom = root / "custom-code-model"
    shutil.copytree(tiny_bert, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (custom / "config.json").write_text(json.dumps(config))
    out["custom"] = custom

    blocker = root / "a-file"
    blocker.write_text("not a folder")
    out["file_home"] = blocker / "home"
    return out


def _cases(files: dict[str, Path], model: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, the start of the one error line's message)."""
    user = ["--train-file", str(files["train"]), "--text-column", "text"]
    cases = {
        "unknown task": (["--task", "nope"], "unknown task 'nope'; choose one of"),
        "too many layers": (["--remove", "6"], "cannot remove 6 layers"),
        "remove 0": (["--remove", "0"], "--remove 0: choose 1..2 (the model has 3 encoder"),
        "unknown strategy": (["--strategy", "best-guess"], "unknown strategy 'best-guess'"),
        "missing data file": (["--train-file", "missing.csv", "--text-column", "text"],
                              "--train-file 'missing.csv': no such file"),
        "missing model": (["--model", "./no/such/model"],
                          "model directory './no/such/model' does not exist"),
        "lr inf": (["--lr", "inf"], "--lr inf: input should be a finite number"),
        "lr nan": (["--lr", "nan"], "--lr nan: input should be a finite number"),
        "epochs inf": (["--epochs", "inf"], "--epochs inf: input should be a finite number"),
        "negative clipping": (["--max-grad-norm", "-1"],
                              "--max-grad-norm -1.0: input should be greater than or equal"),
        "unknown device": (["--device", "tpu"], "--device 'tpu': choose auto, cpu, cuda"),
        "unknown precision": (["--precision", "fp8"], "--precision 'fp8': choose one of"),
        "dev file with a GLUE task": (["--task", "sst2", "--dev-file", str(files["train"])],
                                      "--dev-file is for your own data"),
        "task and train file": (["--task", "sst2", *user],
                                "--task sst2 and --train-file: choose one"),
        "metric with a GLUE task": (["--metric", "f1"], "--metric f1: a GLUE task (sst2)"),
        "text column with a GLUE task": (["--text-column", "text"],
                                         "--text-column: a GLUE task (sst2) has its own columns"),
        "data dir with a train file": ([*user, "--data-dir", "data/glue"],
                                       "--data-dir is the folder of GLUE tasks; with "
                                       "--train-file it would be ignored"),
        "pre-filter without greedy": (["--strategy", "top", "--prefilter-keep", "2"],
                                      "--prefilter-keep 2: only the greedy strategy"),
        "unknown search": (["--search", "fast"],
                           "--search 'fast': choose one of: full, halving, warm"),
        "search without greedy": (["--strategy", "top", "--search", "halving"],
                                  "--search halving: only the greedy strategy searches"),
        "search fraction with the full search": (["--search-fraction", "0.5"],
                                                 "--search-fraction 0.5: the share of the "
                                                 "budget is for --search halving or warm"),
        "search fraction above 1": (["--search", "warm", "--search-fraction", "1.5"],
                                    "--search-fraction 1.5: input should be less than or "
                                    "equal to 1"),
        "task type with a GLUE task": (["--task-type", "regression"],
                                       "--task-type regression: a GLUE task (sst2)"),
        "misspelt task type": ([*user, "--task-type", "regresion"],
                               "--task-type 'regresion': choose one of: classification, "
                               "regression"),
        "metric of the other task type": ([*user, "--metric", "spearman"],
                                          "--metric 'spearman': choose a classification metric"),
        "one training class": (["--train-file", str(files["one_class"]), "--dev-file",
                                str(files["train"]), "--text-column", "text"],
                               "the training data one_class.csv holds one class ('1')"),
        "dev label never trained": ([*user, "--dev-file", str(files["dev_new_label"])],
                                    "dev label(s) '2' in dev_new_label.csv (1 row(s)) never "
                                    "occur in the training data train.csv"),
        "NaN regression target": (["--train-file", str(files["regression_nan"]),
                                   "--dev-file", str(files["regression"]), "--text-column",
                                   "text", "--task-type", "regression"],
                                  "label 'NaN' in column 'label' of regression_nan.csv "
                                  "(data row 4) is not a finite number"),
        "truncated weights": (["--model", str(files["truncated"])],
                              f"the weights file {files['truncated']}/model.safetensors is "
                              "truncated"),
        "custom model code": (["--model", str(files["custom"])],
                              f"model '{files['custom']}' asks to run its own code"),
    }
    if not torch.cuda.is_available():
        cases["no CUDA device"] = (["--device", "cuda"],
                                   "--device 'cuda': choose cpu: this torch build sees no "
                                   "CUDA device")
        cases["fp16 on a CPU"] = (["--device", "cpu", "--precision", "fp16"],
                                  "--precision fp16: choose fp32: mixed precision is for a "
                                  "CUDA device")
    return {name: ([*args] if "--model" in args else ["--model", str(model), *args], text)
            for name, (args, text) in cases.items()}


CASE_NAMES = [
    "unknown task", "too many layers", "remove 0", "unknown strategy", "missing data file",
    "missing model", "lr inf", "lr nan", "epochs inf", "negative clipping", "unknown device",
    "unknown precision", "dev file with a GLUE task", "task and train file",
    "metric with a GLUE task", "text column with a GLUE task", "data dir with a train file",
    "pre-filter without greedy", "unknown search", "search without greedy",
    "search fraction with the full search", "search fraction above 1",
    "task type with a GLUE task", "misspelt task type",
    "metric of the other task type", "one training class", "dev label never trained",
    "NaN regression target", "truncated weights", "custom model code", "no CUDA device",
    "fp16 on a CPU",
]


def _check_refused(done: subprocess.CompletedProcess, expected: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(lines) == 1, done.stderr  # one line, not wrapped, no traceback
    assert lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_refused_up_front_in_a_new_home(name, files, tiny_bert, tmp_path):
    cases = _cases(files, tiny_bert)
    if name not in cases:
        pytest.skip("this machine has a CUDA device")
    args, expected = cases[name]
    home = tmp_path / "new-home"
    line = _check_refused(_glp("prune", *args, "--home", str(home)), expected)
    print(f"{name}: {line}")
    assert not home.exists()  # nothing created: no folders, no store


@pytest.mark.slow  # its home comes from a real glp prune in a subprocess
@pytest.mark.parametrize("name", CASE_NAMES)
def test_refused_without_touching_an_existing_home(name, files, tiny_bert, existing_home):
    cases = _cases(files, tiny_bert)
    if name not in cases:
        pytest.skip("this machine has a CUDA device")
    before = _snapshot(existing_home)
    args, expected = cases[name]
    _check_refused(_glp("prune", *args, "--home", str(existing_home)), expected)
    assert _snapshot(existing_home) == before


@pytest.mark.slow  # the real command in a subprocess
def test_a_rejected_command_leaves_nothing_in_the_working_directory(tmp_path):
    # The real command, in a terminal 60 columns wide, with the default home ./.glp.
    done = _subprocess("prune", "--task", "nope", "--train-limit", "10", cwd=tmp_path)
    line = _check_refused(done, "unknown task 'nope'; choose one of:")
    assert len(line) > 60  # longer than the terminal, and still one line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["under a file", "read-only"])
def test_a_home_that_cannot_be_written_is_one_line(where, files, tiny_bert, tmp_path):
    if where == "under a file":
        home = files["file_home"]
    else:
        if os.geteuid() == 0:
            home = Path("/proc/glp-home")  # not even root can create folders in /proc
        else:
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            home = locked / "home"
    done = _glp("prune", "--model", str(tiny_bert), *TINY, "--home", str(home))
    _check_refused(done, f"--home {home}: cannot write there")
    assert not home.exists()


def test_gc_on_a_missing_home_is_one_line(tmp_path):
    done = _glp("gc", "--home", str(tmp_path / "nothing"))
    _check_refused(done, "no such folder")


COMPRESS = ["--task", "sst2", "--train-limit", "40", "--eval-limit", "20", "--epochs", "1",
            "--max-length", "16", "--batch-size", "16"]


@pytest.mark.parametrize("args, expected", [
    (["--method", "magic"],
     "--method 'magic': choose one of mlpruning, grain, post-training, lowrank"),
    (["--density", "0"], "--density 0.0: choose a fraction in (0, 1]"),
    (["--density", "1.5"], "--density 1.5: choose a fraction in (0, 1]"),
    (["--density", "0.01"],
     "--density 0.01: choose a density in [0.35, 1] (this model keeps at least"),
    (["--density", "0.5", "--density", "0.501"],
     "--density 0.5 and 0.501: each size gets its own registry alias, here both "
     "density-50"),
    (["--block-size", "-1"], "--block-size -1: choose 0 (off) or a block width"),
    (["--pruning-epochs", "nan"], "--pruning-epochs nan: choose a positive number"),
    (["--lr", "inf"], "--lr inf: input should be a finite number"),
    (["--method", "lowrank", "--ratio", "1"], "--ratio 1.0: choose a compression ratio > 1"),
    (["--method", "lowrank", "--ratio", "400"],
     "--ratio 400: choose at most 16.0 (a 32x32 matrix would keep rank"),
    (["--method", "lowrank", "--ratio", "4", "--ratio", "4"],
     "--ratio 4 and 4: each size gets its own registry alias"),
    (["--method", "lowrank", "--modules", "query,pooler"],
     "--modules pooler: choose from query, key, value, output, ffn_in, ffn_out, embeddings"),
    (["--method", "lowrank", "--decoder", "linear"],
     "--decoder is an option of autoencoder; --method lowrank does not use it"),
    (["--method", "autoencoder", "--fisher"], "--fisher is an option of lowrank"),
    (["--method", "autoencoder", "--decoder", "cubic"],
     "--decoder 'cubic': choose one of nonlinear, linear"),
    (["--method", "autoencoder", "--ratio", "500"], "autoencoder of a"),
    (["--method", "lowrank", "--density", "0.3"],
     "--density does not size lowrank; it is sized by --ratio"),
    (["--ratio", "4"], "--ratio does not size mlpruning; it is sized by --density"),
    (["--modules", "query"],
     "--modules is an option of lowrank and autoencoder; --method mlpruning"),
    (["--method", "grain", "--final-epochs", "2"],
     "--final-epochs is an option of mlpruning; --method grain does not use it"),
    (["--grain-start", "0.1"], "--grain-start is an option of grain; --method mlpruning does not"),
    (["--method", "grain", "--grain-start", "0.5", "--grain-end", "0.3"],
     "--grain-end 0.3: choose a fraction from the pruning start (0.5) to 1"),
    (["--method", "grain", "--ema", "1"], "--ema 1.0: choose in [0, 1)"),
    (["--method", "grain", "--density", "0.001"],
     "--density 0.001: choose a density in [0.048, 1] (this model keeps at least"),
    (["--method", "grain", "--kd-weight", "0"],
     "--kd-weight 0: choose a weight above 0 when the hard-label weight is 0"),
    (["--method", "lowrank", "--temperature", "4"],
     "--temperature is an option of mlpruning and grain; --method lowrank"),
])
def test_compress_refuses_bad_input_up_front(args, expected, tiny_bert, tmp_path):
    home = tmp_path / "new-home"
    _check_refused(_glp("compress", "--model", str(tiny_bert), *COMPRESS, *args, "--home",
                        str(home)), expected)
    assert not home.exists()


def test_export_refuses_what_is_not_a_model(tmp_path):
    _check_refused(_glp("export", str(tmp_path), "--onnx"), "is not a model directory")
    _check_refused(_glp("export", str(tmp_path)), "glp export needs a format: --onnx")
