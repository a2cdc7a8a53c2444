"""End to end through the CLI on the real embedded MiniLM, with a tiny budget."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ARGS = ["prune", "--task", "SST-2", "--remove", "1", "--train-limit", "120", "--eval-limit",
        "60", "--epochs", "1", "--max-length", "32", "--seeds", "1", "--lr", "1e-4"]


def _glp(home, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args, "--home", str(home)],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("e2e")
    first = _glp(home, *ARGS)
    assert first.returncode == 0, first.stdout + first.stderr
    second = _glp(home, *ARGS)
    assert second.returncode == 0, second.stdout + second.stderr
    return home, first.stdout, second.stdout


def test_tables_and_summary(runs):
    home, first, _ = runs
    candidates = ds.dataset(home / "parquet" / "candidates").to_table().to_pylist()
    selections = ds.dataset(home / "parquet" / "selections").to_table().to_pylist()
    finals = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    assert sorted(r["layer"] for r in candidates) == [0, 1, 2, 3, 4, 5]
    assert len(selections) == 1 and sorted(r["depth"] for r in finals) == [5, 6]
    assert "Pruning order" in first and "8 computed, 0 reused" in first
    # Not a terminal: a line for each finished candidate, not bars drawn at the end.
    assert re.search(r"^\d\d:\d\d:\d\d 6 candidates: 6/6$", first, re.MULTILINE), first
    assert "glp ui --home" in first and str(home / "parquet") in first
    # Only the final models keep weights, and none of them asks to run custom code.
    weights = sorted(p.parent.parent.name for p in home.glob("artifacts/*/*/model.safetensors"))
    assert weights == ["finals", "finals"]
    for config in home.glob("artifacts/finals/*/config.json"):
        assert "auto_map" not in config.read_text()
    assert {r["device"] for r in candidates + finals} == {"cpu"}


def test_rerun_reuses_everything(runs):
    home, _, second = runs
    assert "0 computed, 8 reused" in second
    assert len(ds.dataset(home / "parquet" / "candidates").to_table()) == 6


def test_registered_model_loads_and_predicts(runs):
    """The README's three lines, in a fresh interpreter (no registry URI set by the flow)."""
    import os
    import subprocess
    import sys

    home, _, _ = runs
    code = (
        f"import json, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri('sqlite:///{home / 'mlflow.db'}')\n"
        "uri = 'models:/glp-all-minilm-l6-v2-sst2-greedy@best'\n"
        "model = mlflow.pyfunc.load_model(uri)\n"
        "text = pd.DataFrame({'text': ['a warm, funny and moving film']})\n"
        "label = model.predict(text)['label'][0]\n"
        "folder = mlflow.artifacts.download_artifacts(uri + '/artifacts/text_model')\n"
        "config = json.load(open(folder + '/config.json'))\n"
        "print(label, config['num_hidden_layers'])\n"
    )
    # A user's fresh shell: no URI that an in-process flow of this test session has set.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    done = subprocess.run([sys.executable, "-c", code], cwd=home, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    label, layers = done.stdout.split()[-2:]
    assert label in {"0", "1"} and layers == "5"


COMPRESS = ["compress", "--task", "sst2", "--density", "0.4", "--train-limit", "120",
            "--eval-limit", "60", "--epochs", "1", "--pruning-epochs", "1", "--max-length", "32",
            "--seeds", "1", "--lr", "1e-4"]
METHODS = {"mlpruning": ["--final-epochs", "1"], "grain": ["--method", "grain"]}

# Runs an exported graph with onnxruntime while glp, transformers and torch cannot be
# imported: deployment needs neither.
_ONNX_ONLY = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("glp", "transformers", "torch"):
            raise ImportError(f"{name} is not available here")
sys.meta_path.insert(0, Refuse())
import numpy as np, onnxruntime, tokenizers
tokenizer = tokenizers.Tokenizer.from_file(sys.argv[2])
ids = np.array([tokenizer.encode("a warm and funny film").ids], dtype=np.int64)
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids)}
feed = {i.name: feed[i.name] for i in session.get_inputs()}
print(" ".join(f"{v:.6f}" for v in session.run(["logits"], feed)[0][0]))
"""


@pytest.fixture(scope="module")
def compress_home(tmp_path_factory):
    """One home for both methods: the second reuses the first's fine-tuned MiniLM, which
    each compresses (and distils from), as a user's second ``glp compress`` would."""
    return tmp_path_factory.mktemp("compress") / "home"


@pytest.mark.parametrize("method", METHODS)
def test_compress_minilm_reloads_and_runs_as_onnx_without_glp(method, compress_home, tmp_path):
    import torch

    import glp
    from glp.core.models import load_tokenizer
    from glp.core.plan import Plan

    home = compress_home
    done = _glp(home, *COMPRESS, *METHODS[method])
    assert done.returncode == 0, done.stdout + done.stderr
    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    row = next(r for r in rows if r["method"] == method)
    plan = Plan.from_json(row["plan"])
    assert row["encoder_density"] <= 0.4 and (plan.heads if method == "mlpruning" else plan.vo)
    model = glp.load_pretrained(row["model_dir"])
    tokens = load_tokenizer(row["model_dir"])(["a warm and funny film"], return_tensors="pt")
    with torch.no_grad():
        expected = model(**tokens).logits[0].tolist()
    out = tmp_path / "model.onnx"
    exported = subprocess.run([sys.executable, "-m", "flows.cli", "export", row["model_dir"],
                               "--onnx", "--out", str(out)], capture_output=True, text=True,
                              timeout=600)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert "max |logit difference| vs PyTorch" in exported.stdout
    served = subprocess.run([sys.executable, "-c", _ONNX_ONLY, str(out),
                             f"{row['model_dir']}/tokenizer.json"], capture_output=True,
                            text=True, timeout=300)
    assert served.returncode == 0, served.stderr
    actual = [float(v) for v in served.stdout.split()]
    assert actual == pytest.approx(expected, abs=1e-4)


def test_lowrank_compresses_a_registered_pruned_minilm(runs):
    """Greedy layer pruning, then Fisher-weighted SVD of what remains, from the registry:
    one plan with the removed layer and the ranks, smaller and reloadable."""
    import glp
    from glp.core.plan import Plan

    home, _, _ = runs
    uri = "models:/glp-all-minilm-l6-v2-sst2-greedy@depth-5"
    done = _glp(home, "compress", "--method", "lowrank", "--model", uri, "--fisher",
                "--ratio", "4", "--modules", "ffn_in,ffn_out", "--task", "sst2",
                "--train-limit", "120", "--eval-limit", "60", "--max-length", "32")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "models: 1 computed" in done.stdout
    rows = ds.dataset(home / "parquet" / "finals").to_table().to_pylist()
    given = next(r for r in rows if r["method"] == "input")
    row = next(r for r in rows if r["method"] == "lowrank")
    plan = Plan.from_json(row["plan"])
    assert len(plan.removed) == 1 and plan.depth == 5
    assert {k.partition(".")[2] for k in plan.ranks} == {"ffn_in", "ffn_out"}
    assert row["parameters"] < given["parameters"] and row["model"] == uri
    assert row["stored_bytes"] < given["stored_bytes"] and row["target_ratio"] == 4.0
    model = glp.load_pretrained(row["model_dir"])
    assert len(glp.core.surgery.encoder_layers(model)) == 5
