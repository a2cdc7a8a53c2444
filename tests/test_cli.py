"""The CLI's bad-input contract: one clear line, a non-zero exit, nothing written."""

from __future__ import annotations

import json

import pytest
from transformers import AlbertConfig, AlbertModel
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def _prune(tmp_path, *args):
    result = runner.invoke(app, ["prune", "--home", str(tmp_path / "home"), *args])
    return result, result.output


@pytest.fixture
def albert(tmp_path):
    path = tmp_path / "albert"
    config = AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    AlbertModel(config).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--remove", "6"], "cannot remove 6 layers"),
        (["--remove", "0"], "--remove 0: choose 1..5 (the model has 6 encoder layers"),
        (["--strategy", "best-guess"], "unknown strategy 'best-guess'"),
        (["--train-file", "missing.csv", "--text-column", "text"], "missing.csv"),
        (["--model", "./no/such/model"], "no/such/model"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, expected):
    result, output = _prune(tmp_path, *args)
    assert result.exit_code == 2, output
    assert expected in output
    assert "Traceback" not in output
    assert not (tmp_path / "home" / "mlflow.db").exists()  # nothing half-registered


def test_missing_column(tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("text,label\ngood,1\nbad,0\n" * 10)
    result, output = _prune(tmp_path, "--train-file", str(data), "--dev-file", str(data),
                            "--text-column", "sentence")
    assert result.exit_code == 2
    assert "'sentence'" in output and "text, label" in output


def test_unsupported_model(tmp_path, albert):
    result, output = _prune(tmp_path, "--model", str(albert))
    assert result.exit_code == 2
    assert "albert" in output.lower() and "supported" in output


def test_ui_without_a_store(tmp_path):
    result = runner.invoke(app, ["ui", "--home", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "no MLflow store" in result.output


def _compare(tmp_path, *args):
    result = runner.invoke(app, ["compare", "--home", str(tmp_path / "home"), *args])
    return result, result.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--strategies", "greedy,middle"], "unknown strategy 'middle'; choose from: greedy"),
        (["--strategies", ","], "no strategies given"),
        (["--remove", "3", "--exhaustive-limit", "10"], "needs 41 fine-tunes"),
        (["--random-orders", "0"], "--random-orders"),
        (["--task", "nope"], "unknown task 'nope'"),
        (["--prefilter-keep", "-1"], "--prefilter-keep"),
        (["--density", "0.3"], "--density sizes mlpruning and grain; give --methods too"),
        (["--ratio", "4"], "--ratio sizes lowrank and autoencoder; give --methods too"),
        (["--pruning-epochs", "3"], "--pruning-epochs trains a width method; give --methods"),
        (["--methods", "greedy,lowrank", "--pruning-epochs", "grain=3"],
         "--pruning-epochs 'grain=3' trains a width method; --methods greedy,lowrank has no "
         "grain"),
    ],
)
def test_compare_bad_input_is_one_line_and_nonzero(tmp_path, args, expected):
    result, output = _compare(tmp_path, *args)
    assert result.exit_code == 2, output
    assert expected in " ".join(output.split())
    assert "Traceback" not in output
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_compare_takes_the_options_of_prune():
    prune_help = runner.invoke(app, ["prune", "--help"], terminal_width=200).output
    compare_help = runner.invoke(app, ["compare", "--help"], terminal_width=200).output
    for option in ("--model", "--task", "--train-file", "--remove", "--train-limit",
                   "--epochs", "--seeds", "--lr", "--prefilter-keep", "--home", "--register"):
        assert option in prune_help and option in compare_help, option
    assert "--strategies" in compare_help and "--random-orders" in compare_help
    assert "--strategy " not in compare_help


def test_bad_task_runner_is_one_line(tmp_path):
    result, output = _prune(tmp_path, "--task-runner", "gpu")
    assert result.exit_code == 2, output
    assert "unknown task runner 'gpu'" in " ".join(output.split())
    assert not (tmp_path / "home" / "mlflow.db").exists()


def test_serve_refuses_a_public_address(tmp_path):
    result = runner.invoke(app, ["serve", "--home", str(tmp_path / "home"), "--host",
                                 "0.0.0.0"])
    assert result.exit_code == 2, result.output
    assert "0.0.0.0" in result.output and "Traceback" not in result.output


def test_help_shows_the_defaults_written_in_brackets():
    """Help texts say ``[default: sst2]``; rich markup must not swallow them as tags."""
    prune_help = " ".join(runner.invoke(app, ["prune", "--help"], terminal_width=200)
                          .output.split())
    assert "[default: sst2]" in prune_help and "[default: all]" in prune_help
    assert "[default: ./.glp]" in prune_help


def test_an_error_naming_a_value_in_brackets_shows_it(tmp_path):
    """Error lines are printed as text: a bad value such as ``[sst2]`` is not markup."""
    result, output = _prune(tmp_path, "--task", "[sst2]")
    assert result.exit_code == 2, output
    assert "'[sst2]'" in " ".join(output.split())


def test_bench_prints_each_runtime_at_batch_1_and_32(tiny_bert, tmp_path):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(tiny_bert), "--length", "8", "--repeats", "2",
                                 "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("threads 1, torch ")
    assert lines[1] == f"model 1: {tiny_bert}"  # the whole name, once
    cells = [[c.strip() for c in line.strip("│ ").split("│")] for line in lines
             if line.startswith("│")]
    assert {(c[1], c[2], c[3]) for c in cells} == {
        (runtime, batch, "8") for runtime in ("torch", "onnx", "onnx int8")
        for batch in ("1", "32")}
    assert all(c[0] == "model 1" and float(c[4]) > 0 and float(c[5]) > 0 for c in cells)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 2 and all(r["median_ms"] > 0 for r in rows)
    assert {r["model"] for r in rows} == {f"{tiny_bert} | {runtime}"
                                           for runtime in ("torch", "onnx", "onnx int8")}


@pytest.mark.parametrize("args, expected", [
    (["--batch-size", "0"], "--batch-size 0: choose a whole number >= 1"),
    (["--length", "-3"], "--length -3: choose a whole number >= 1"),
])
def test_bench_refuses_bad_input(args, expected, tiny_bert):
    result = runner.invoke(app, ["bench", str(tiny_bert), *args])
    assert result.exit_code == 2 and expected in " ".join(result.output.split())


def test_bench_refuses_what_is_not_a_model(tmp_path):
    result = runner.invoke(app, ["bench", str(tmp_path)])
    assert result.exit_code == 2 and "not a model directory" in result.output


def test_bench_names_a_registry_uri_it_cannot_find(tmp_path):
    result = runner.invoke(app, ["bench", "models:/nothing@best", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert (f"glp bench models:/nothing@best: the run home {tmp_path} has no registry"
            in " ".join(result.output.split()))


@pytest.fixture
def registry_home(tmp_path):
    """A run home whose registry holds one model, glp-x, with the aliases best and depth-4."""
    from mlflow.tracking import MlflowClient

    home = tmp_path / "registry-home"
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("glp-x")
    version = client.create_model_version("glp-x", source=str(tmp_path)).version
    for alias in ("best", "depth-4"):
        client.set_registered_model_alias("glp-x", alias, version)
    return home


@pytest.mark.parametrize(("uri", "expected"), [
    ("models:/nosuch@best", "has no model 'nosuch'; registered names: glp-x"),
    ("models:/glp-x@depth-9", "'glp-x' has no alias 'depth-9'; its aliases: best, depth-4"),
    ("models:/glp-x/7", "'glp-x' has no version 7"),
    ("models:/glp-x", "name a version, models:/NAME@alias or models:/NAME/VERSION"),
])
def test_compress_refuses_a_registry_uri_the_registry_does_not_hold(uri, expected,
                                                                     registry_home):
    before = sorted(p.name for p in registry_home.iterdir())
    result = runner.invoke(app, ["compress", "--method", "lowrank", "--model", uri,
                                 "--home", str(registry_home)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and f"--model {uri}" in output and expected in output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2
    assert sorted(p.name for p in registry_home.iterdir()) == before


def test_compress_with_a_registry_uri_and_a_new_home_creates_nothing(tmp_path):
    home = tmp_path / "new"
    result = runner.invoke(app, ["compress", "--method", "lowrank", "--model",
                                 "models:/nosuch@best", "--home", str(home)])
    assert result.exit_code == 2 and "has no registry" in result.output
    assert not home.exists()


# ---------------------------------------------------------------- glp pick


@pytest.fixture
def picked_home(tmp_path):
    """A run home whose finals hold a greedy search's models (fake rows, real Parquet)."""
    from tasks.records import write_part
    from tests.glp.test_pick import ROWS

    home = tmp_path / "home"
    write_part(home / "parquet", "finals", "job-a", "finals", ROWS)
    return home


def _pick(home, *args):
    result = CliRunner().invoke(app, ["pick", "--home", str(home), *args], env={"GLP_HOME": None})
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(("args", "last"), [
    (["--max-latency-ms", "70"], "models:/glp-g/2"),
    (["--min-speedup", "1.9"], "/m/greedy3-41"),  # not registered: the model directory
    (["--min-metric", "0.805"], "models:/glp-g/1"),
    (["--max-parameters", "18000000", "--task", "SST2"], "models:/glp-g/2"),
])
def test_pick_prints_the_chosen_model_last(picked_home, args, last):
    code, out, err = _pick(picked_home, *args)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1] == last
    assert any(line.startswith("picked: greedy") for line in lines)
    assert any(line.startswith("plan: layers removed: ") for line in lines)


def test_pick_with_nothing_in_budget_is_one_line_naming_the_closest(picked_home):
    code, out, err = _pick(picked_home, "--max-latency-ms", "45")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: no model meets --max-latency-ms 45 (5 models, 10 "
                               "deployments searched); the closest: greedy, 3 layers")


@pytest.mark.parametrize(("args", "message"), [
    ([], "error: give a budget: --max-latency-ms X"),
    (["--max-latency-ms", "-1"], "error: --max-latency-ms -1.0: expected a finite number above 0"),
    (["--min-metric", "0.5", "--task", "cola"], "error: --task cola: no final models of it"),
    (["--min-metric", "0.5", "--alias", "production"],
     "error: --alias production: the chosen model was not registered"),
    (["--min-metric", "0.5", "--precision", "fp16"], "error: --precision fp16: expected fp32 "
                                                     "or int8"),
    (["--min-metric", "0.5", "--batch", "8"], "error: --batch 8: latencies are measured at "
                                              "batch 1 and 32"),
    (["--min-metric", "0.5", "--precision", "int8"], "error: --precision int8: no final model"),
])
def test_pick_refuses_bad_input_in_one_line(picked_home, args, message):
    code, out, err = _pick(picked_home, *args)
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith(message), err


def test_pick_needs_one_model_and_task(picked_home, tmp_path):
    from tasks.records import write_part
    from tests.glp.test_pick import row

    write_part(picked_home / "parquet", "finals", "job-b", "finals",
               [{**row("greedy", 5, 40, 0.5, latency=1.0), "job_id": "job-b", "task": "cola"}])
    code, _, err = _pick(picked_home, "--min-metric", "0.1")
    assert code == 2
    assert "holds models of 2 model/task pairs (minilm on cola, minilm on sst2)" in err
    code, out, _ = _pick(picked_home, "--min-metric", "0.1", "--task", "cola")
    assert code == 0 and out.strip().splitlines()[-1] == "/m/greedy5-40"
    assert _pick(tmp_path / "empty", "--min-metric", "0.1")[0] == 2


def test_pick_moves_an_alias_in_the_registry(picked_home):
    from mlflow.tracking import MlflowClient

    from tasks.home import RunHome

    uri = RunHome.resolve(str(picked_home)).tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("glp-g")
    for _ in range(2):
        client.create_model_version("glp-g", source=str(picked_home))
    code, out, err = _pick(picked_home, "--max-latency-ms", "70", "--alias", "production")
    assert code == 0, err
    assert "alias @production of glp-g now points at version 2" in out
    assert str(client.get_model_version_by_alias("glp-g", "production").version) == "2"


def test_compare_prints_every_name_it_registered():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from glp.report.terminal import print_registered

    out = io.StringIO()
    console = Console(file=out, width=300)
    finals = [{"registered_model": None}, {"registered_model": "glp-m-sst2-greedy"},
              {"registered_model": "glp-m-sst2-greedy"},
              {"registered_model": "glp-m-sst2-greedy2-mlpruning"}, {}]
    print_registered(console, SimpleNamespace(finals=finals))
    assert out.getvalue().startswith(
        "registered:     glp-m-sst2-greedy, glp-m-sst2-greedy2-mlpruning (models:/NAME@best")
    out.truncate(0)
    print_registered(console, SimpleNamespace(finals=finals[:1]))
    assert out.getvalue() == ""  # nothing registered: no line


def test_pick_chooses_across_precisions_and_prints_the_int8_version(tmp_path):
    """With int8 scores and latencies, the int8 graph of a model is a deployment of its
    own: its int8 score against the floor, its int8 latency, its int8 version's URI."""
    from tasks.records import write_part
    from tests.glp.test_pick import ROWS

    rows = [{**r, "int8_value": r["value"] - 0.005, "onnx_b32_ms": r["latency_ms"] and
             r["latency_ms"] / 2, "int8_b32_ms": r["latency_ms"] and r["latency_ms"] / 4,
             "int8_model_version": r["model_version"] and str(int(r["model_version"]) + 10)}
            for r in ROWS]
    home = tmp_path / "home"
    write_part(home / "parquet", "finals", "job-a", "finals", rows)
    code, out, err = _pick(home, "--min-metric", "0.78")
    assert code == 0, err
    lines = out.strip().splitlines()
    # the fastest that reaches 0.78: greedy at 4 layers in int8 (0.785 at 16.75 ms)
    assert lines[-1] == "models:/glp-g/12"
    assert any(line.startswith("picked: greedy, 4 layers as int8 onnxruntime") for line in lines)
    assert "mlflow models serve -m models:/glp-g/12 --env-manager local" in out
    code, out, _ = _pick(home, "--min-metric", "0.78", "--precision", "fp32")
    assert code == 0 and out.strip().splitlines()[-1] == "models:/glp-g/2"  # onnxruntime fp32
    # a floor only fp32 reaches: int8 scores 0.005 lower
    code, out, _ = _pick(home, "--min-metric", "0.81")
    assert code == 0 and "as fp32 onnxruntime" in out


def test_pick_of_an_unregistered_int8_model_prints_its_int8_folder(tmp_path):
    """A run without --register: the int8 choice's last line is its text-in folder, never
    'None'."""
    from tasks.records import write_part
    from tests.glp.test_pick import ROWS

    rows = [{**r, "int8_value": r["value"], "int8_b32_ms": r["latency_ms"] and
             r["latency_ms"] / 4, "int8_dir": f"/int8/{r['strategy']}{r['depth']}-{r['seed']}",
             "registered_model": None, "model_version": None} for r in ROWS]
    home = tmp_path / "home"
    write_part(home / "parquet", "finals", "job-a", "finals", rows)
    code, out, err = _pick(home, "--min-metric", "0.78", "--precision", "int8")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "/int8/greedy4-41"


@pytest.mark.parametrize(("args", "expected"), [
    (["pick", "--max-parameters", "abc"], "error: --max-parameters abc: input should be a "
                                          "valid integer"),
    (["pick", "--max-latency-ms=1x"], "error: --max-latency-ms 1x: input should be a valid "
                                      "number"),
])
def test_a_bad_number_is_one_line_naming_the_option_and_the_value(args, expected, tmp_path,
                                                                  monkeypatch, capfd):
    import sys

    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["glp", *args, "--home", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capfd.readouterr().err
    assert exited.value.code == 2
    assert " ".join(err.split()).startswith(expected) and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # a Python subprocess
def test_main_called_by_another_program_leaves_its_exit_code_alone(tmp_path):
    """Only the glp program itself skips the interpreter's teardown at exit: a program that
    calls ``main()`` (a test, a script) keeps its own exit code (it was 2, the last glp
    command's, after a whole passing test run)."""
    import subprocess
    import sys

    code = ("import sys\n"
            f"sys.argv = ['glp', 'pick', '--max-parameters', 'abc', '--home', {str(tmp_path)!r}]\n"
            "from flows.cli import main\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code == 2\n"
            "sys.exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_log_gets_a_line_as_each_piece_of_work_finishes():
    """Not a terminal (nohup, a scheduler's log): bars would show only at the end."""
    import io

    from rich.console import Console

    from flows.launch import LineReporter

    out = io.StringIO()
    reporter = LineReporter(Console(file=out, width=40))
    candidates = reporter.begin("candidates", "6 candidates", 6)
    steps = reporter.begin("steps", "  candidate without layer 3, seed 41", None)
    for step in range(1, 500):
        reporter.update(steps, step, 500)  # no line per training step
    reporter.end(steps)
    reporter.update(candidates, 1)
    reporter.update(candidates, 1)  # unchanged: no second line
    reporter.note("greedy 1: removed layer 3 (f1 0.8123)")
    lines = [line.split(" ", 1) for line in out.getvalue().splitlines()]
    assert all(len(clock) == 8 and clock[2] == ":" for clock, _ in lines)
    assert [text for _, text in lines] == [
        "6 candidates: 0/6", "candidate without layer 3, seed 41: started", "6 candidates: 1/6",
        "done: greedy 1: removed layer 3 (f1 0.8123)"]  # not wrapped at 40 columns
