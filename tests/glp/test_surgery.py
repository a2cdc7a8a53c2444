"""Layer removal on tiny random models of every supported family, through save and reload."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    MPNetConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from glp import GlpError
from glp.core.anatomy import encoder_layers, kept_layers, removed_layers
from glp.core.models import check_supported, num_encoder_layers
from glp.core.surgery import remove_layers

COMMON = dict(
    vocab_size=100,
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    num_labels=3,
)


def tiny_config(family: str, layers: int = 4):
    """A random-weights config of the given family, small enough to build in milliseconds."""
    if family == "bert":
        return BertConfig(num_hidden_layers=layers, **COMMON)
    if family == "roberta":
        return RobertaConfig(num_hidden_layers=layers, **COMMON)
    if family == "xlm-roberta":
        return XLMRobertaConfig(num_hidden_layers=layers, **COMMON)
    if family == "electra":
        return ElectraConfig(num_hidden_layers=layers, embedding_size=16, **COMMON)
    if family == "distilbert":
        return DistilBertConfig(
            vocab_size=100,
            dim=32,
            hidden_dim=37,
            n_layers=layers,
            n_heads=2,
            max_position_embeddings=64,
            num_labels=3,
        )
    if family == "mpnet":
        return MPNetConfig(num_hidden_layers=layers, **COMMON)
    if family == "deberta-v2":
        return DebertaV2Config(
            num_hidden_layers=layers,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=16,
            max_relative_positions=-1,
            **COMMON,
        )
    raise AssertionError(family)


FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet", "deberta-v2"]


def tiny_model(family: str, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, layers))
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # ids from 5 up: clear of every family's special/padding ids.
    input_ids = torch.randint(5, 100, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # padding exercises the mask path
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_layers_every_family(family, tmp_path):
    model = tiny_model(family)
    assert check_supported(model.config).model_type == family
    original_layers = list(encoder_layers(model))
    assert len(original_layers) == 4
    assert kept_layers(model) == [0, 1, 2, 3]
    unpruned_params = n_params(model)

    returned = remove_layers(model, {3, 1})

    assert returned is model
    layers = encoder_layers(model)
    assert len(layers) == 2
    assert num_encoder_layers(model.config) == 2
    assert model.config.num_hidden_layers == 2  # DistilBERT maps this to n_layers
    assert kept_layers(model) == [0, 2]
    assert removed_layers(model) == [1, 3]
    assert model.config.glp_kept_layers == [0, 2]
    assert model.config.glp_removed_layers == [1, 3]
    # The same module objects, not copies: weights and any training state stay attached.
    assert layers[0] is original_layers[0]
    assert layers[1] is original_layers[2]
    assert n_params(model) < unpruned_params

    with torch.no_grad():
        logits = model(**batch()).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()

    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["glp_kept_layers"] == [0, 2]
    assert saved["glp_removed_layers"] == [1, 3]
    assert saved["n_layers" if family == "distilbert" else "num_hidden_layers"] == 2

    # Plain transformers, no glp: the checkpoint alone describes the pruned model.
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert len(encoder_layers(reloaded)) == 2
    assert n_params(reloaded) == n_params(model)
    assert reloaded.config.glp_kept_layers == [0, 2]
    assert reloaded.config.glp_removed_layers == [1, 3]
    with torch.no_grad():
        reloaded_logits = reloaded(**batch()).logits
    torch.testing.assert_close(reloaded_logits, logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_equals_a_model_built_from_the_kept_layers(family):
    """Removing layer 1 of 3 computes exactly what a 2-layer model with layers 0 and 2 does."""
    model = tiny_model(family, layers=3)
    state = {
        key.replace(".layer.2.", ".layer.1."): value
        for key, value in model.state_dict().items()
        if ".layer.1." not in key
    }
    two = tiny_model(family, layers=2, seed=1)
    two.load_state_dict(state)  # strict: every key of the 2-layer model is covered
    remove_layers(model, [1])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, two(**batch()).logits)


def test_layer_idx_is_renumbered():
    model = tiny_model("bert")
    remove_layers(model, [0, 2])
    for position, layer in enumerate(encoder_layers(model)):
        assert layer.attention.self.layer_idx == position


def test_distilbert_container_count_follows():
    model = tiny_model("distilbert")
    remove_layers(model, [0])
    assert model.distilbert.transformer.n_layers == 3
    assert model.config.n_layers == 3


def test_composition_records_original_indices(tmp_path):
    model = tiny_model("bert", layers=4)
    original = list(encoder_layers(model))
    remove_layers(model, [1])  # kept 0 2 3
    remove_layers(model, [1])  # current index 1 is original layer 2
    assert kept_layers(model) == [0, 3]
    assert removed_layers(model) == [1, 2]
    assert list(encoder_layers(model)) == [original[0], original[3]]

    # Composition across a save/reload too.
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    remove_layers(reloaded, [0])
    assert kept_layers(reloaded) == [3]
    assert removed_layers(reloaded) == [0, 1, 2]
    assert reloaded.config.num_hidden_layers == 1


def test_empty_removal_writes_record_only():
    model = tiny_model("roberta", layers=3)
    before = list(encoder_layers(model))
    remove_layers(model, [])
    assert list(encoder_layers(model)) == before
    assert model.config.glp_kept_layers == [0, 1, 2]
    assert model.config.glp_removed_layers == []


def test_per_layer_config_lists_are_pruned():
    model = tiny_model("bert", layers=4)
    model.config.layer_types = ["a", "b", "c", "d"]
    remove_layers(model, [0, 2])
    assert model.config.layer_types == ["b", "d"]


@pytest.mark.parametrize(
    ("layers", "fragment"),
    [
        ([4], "cannot remove layer 4: the model has 4 encoder layers; choose indices in 0..3"),
        ([-1], "cannot remove layer -1"),
        ([0, 1, 2, 3], "at least one layer must remain: choose at most 3 layers"),
        ([2, 2], "layer 2 is listed more than once"),
        (["1"], "layer index '1' is not an integer"),
        (3, "must be a collection of layer indices"),
    ],
)
def test_bad_layer_sets_are_rejected_untouched(layers, fragment):
    model = tiny_model("bert")
    before = list(encoder_layers(model))
    with pytest.raises(GlpError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        remove_layers(model, layers)
    assert list(encoder_layers(model)) == before
    assert model.config.num_hidden_layers == 4
    assert not hasattr(model.config, "glp_kept_layers")


def test_stale_record_is_rejected():
    model = tiny_model("bert")
    model.config.glp_kept_layers = [0, 1]  # claims 2 layers, the model has 4
    with pytest.raises(GlpError, match="stale"):
        remove_layers(model, [0])


TINY = dict(vocab_size=100, hidden_size=32, num_attention_heads=2, intermediate_size=37)


def test_albert_is_rejected_with_reason():
    config = AlbertConfig(num_hidden_layers=2, embedding_size=16, **TINY)
    with pytest.raises(GlpError, match="'albert' is not supported: ALBERT shares one layer") as e:
        check_supported(config)
    assert "supported: bert, roberta" in str(e.value)
    model = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(GlpError, match="ALBERT shares one layer"):
        encoder_layers(model)
    with pytest.raises(GlpError, match="ALBERT"):
        remove_layers(model, [0])


def test_decoder_only_is_rejected():
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    with pytest.raises(GlpError, match="'gpt2' is a decoder-only model; glp prunes encoders"):
        check_supported(config)
    model = AutoModelForSequenceClassification.from_config(config)
    with pytest.raises(GlpError, match="decoder-only"):
        encoder_layers(model)


def test_bert_configured_as_decoder_is_rejected():
    config = BertConfig(num_hidden_layers=2, is_decoder=True, **TINY)
    with pytest.raises(GlpError, match="configured as a decoder"):
        check_supported(config)


def test_model_without_layer_list_is_rejected():
    model = tiny_model("bert")
    model.bert.encoder = torch.nn.Identity()
    with pytest.raises(GlpError, match="no encoder layer list"):
        encoder_layers(model)
