"""Offline compression on tiny random models of every family: low-rank factors are exact,
Fisher weighting is what it claims, the autoencoder learns, and every compressed model
round-trips through save, ``glp.load_pretrained`` and ONNX."""

from __future__ import annotations

import copy

import pytest
import torch

from glp import GlpError
from glp.core.checkpoint import (
    CODES_ATTR,
    load_pretrained,
    read_plan,
    save_pretrained,
    saved_parameters,
    stored_bytes,
)
from glp.core.codes import CODES_FILE
from glp.core.factors import LowRankLinear, matrices, svd_factors
from glp.core.plan import OFFLINE_ROLES, ROLES, Plan
from glp.core.surgery import apply_plan
from glp.methods.autoencoder.compress import (
    AutoencoderConfig,
    fold_linear,
    latent_size,
    train_autoencoder,
)
from glp.methods.lowrank.svd import fisher_column_weights, rank_for_ratio, ranks_for_ratio
from tests.glp.test_grain import assert_round_trip
from tests.glp.test_surgery import FAMILIES, batch, n_params, tiny_model


def logits(model):
    with torch.no_grad():
        return model(**batch()).logits


def test_thin_factors_reproduce_the_rank_r_product_exactly():
    torch.manual_seed(0)
    weight = torch.randn(12, 7, dtype=torch.float64)
    second, first = svd_factors(weight, 3)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    assert torch.allclose(second @ first, u[:, :3] @ torch.diag(s[:3]) @ vh[:3])
    linear = torch.nn.Linear(7, 12).double()
    module = LowRankLinear(7, 12, 3).double()
    with torch.no_grad():
        module.first.weight.copy_(first)
        module.second.weight.copy_(second)
        module.second.bias.copy_(linear.bias)
    x = torch.randn(5, 7, dtype=torch.float64)
    assert torch.allclose(module(x), x @ (second @ first).T + linear.bias)


def test_fisher_weighting_minimises_the_weighted_error():
    torch.manual_seed(0)
    weight = torch.randn(10, 8, dtype=torch.float64)
    fisher = torch.rand(10, 8, dtype=torch.float64) ** 4
    scale = fisher_column_weights(fisher)
    second, first = svd_factors(weight, 3)
    plain = second @ first
    second, first = svd_factors(weight, 3, scale)
    weighted = second @ first

    def error(approx):
        return float(((weight - approx) * scale).norm())

    assert error(weighted) < error(plain)
    assert float((weight - plain).norm()) <= float((weight - weighted).norm())


def test_rank_for_ratio_follows_the_reference_rule_and_refuses_too_much():
    assert rank_for_ratio((384, 384), 10) == 19
    assert rank_for_ratio((1536, 384), 10) == 30
    with pytest.raises(GlpError, match="ratio 400: choose at most"):
        rank_for_ratio((32, 32), 400)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_equals_the_original_and_low_rank_round_trips(family, tmp_path):
    model = tiny_model(family)
    expected = logits(model)
    full = {k: min(m.weight.shape) for k, m in matrices(model, OFFLINE_ROLES).items()}
    apply_plan(copy_ := copy.deepcopy(model), Plan(4).offline(full))
    assert torch.allclose(logits(copy_), expected, atol=1e-5)
    # layers removed, then every matrix at ratio 2 (the composition of the two plans)
    apply_plan(model, Plan(4, removed=(1,)))
    plan = Plan(4, removed=(1,)).offline(ranks_for_ratio(model, OFFLINE_ROLES, 2))
    before = n_params(model)
    apply_plan(model, plan)
    assert n_params(model) < before
    assert plan.parameter_counts(model.config)["parameters"] == n_params(model)
    assert_round_trip(model, tmp_path)
    assert read_plan(tmp_path / "m") == plan


@pytest.mark.parametrize("family", FAMILIES)
def test_coded_model_stores_codes_and_decodes_at_load(family, tmp_path):
    model = tiny_model(family)
    coded = train_autoencoder(model, "ffn_in", AutoencoderConfig(ratio=2, epochs=4))
    assert coded.losses[-1] < coded.losses[0]  # the reconstruction loss falls
    setattr(model, CODES_ATTR, {"ffn_in": coded})
    model.glp_plan = Plan(4).offline(coded={"ffn_in": {"latent": coded.latent,
                                                         "hidden": coded.hidden}})
    save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m" / CODES_FILE).is_file()
    assert saved_parameters(tmp_path / "m") < n_params(model)  # the matrices are not stored
    loaded = load_pretrained(tmp_path / "m")
    assert torch.allclose(logits(loaded), logits(model), atol=1e-6)
    assert n_params(loaded) == n_params(model)  # decoded: the architecture is unchanged


@pytest.mark.parametrize("family", ["bert", "distilbert", "deberta-v2"])
def test_linear_decoder_folds_exactly_into_shared_thin_layers(family, tmp_path):
    model = tiny_model(family)
    coded = train_autoencoder(model, "query", AutoencoderConfig(ratio=2, epochs=2,
                                                                decoder="linear"))
    dense = logits(model)
    ranks = fold_linear(model, coded)
    model.glp_plan = Plan(4).offline(ranks=ranks, shared=["query"])
    assert torch.allclose(logits(model), dense, atol=1e-5)
    firsts = {id(m.first) for k, m in matrices(model, ["query"]).items()}
    assert len(firsts) == 1  # one input-side factor for every layer
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert torch.equal(logits(loaded), logits(model))
    assert n_params(loaded) == n_params(model)
    assert len({id(m.first) for m in matrices(loaded, ["query"]).values()}) == 1
    assert stored_bytes(tmp_path / "m") > 0


def test_latent_size_meets_the_ratio():
    for decoder in ("nonlinear", "linear"):
        config = AutoencoderConfig(ratio=10, decoder=decoder)
        latent, hidden = latent_size(2304, 384, config)
        from glp.methods.autoencoder.compress import _storage

        assert _storage(2304, 384, latent, hidden) <= 2304 * 384 / 10
        assert _storage(2304, 384, latent + 1, [s * (latent + 1) for s in
                        (config.decoder_sizes if hidden else ())]) > 2304 * 384 / 10


def test_bad_offline_plans_are_refused():
    with pytest.raises(GlpError, match="rank of '0.query'"):
        Plan(2, ranks={"0.query": 0})
    with pytest.raises(GlpError, match="names layer 1"):
        Plan(2, removed=(1,), ranks={"1.key": 3})
    with pytest.raises(GlpError, match="shared factor"):
        Plan(2, ranks={"0.query": 3, "1.query": 4}, shared=("query",))
    with pytest.raises(GlpError, match="both factorised and coded"):
        Plan(2, ranks={"0.query": 3}, coded={"query": {"latent": 2}})
    with pytest.raises(GlpError, match="choose a role"):
        Plan(2, coded={"pooler": {"latent": 2}})
    plan = Plan(2, ranks={"embeddings": 4, "0.ffn_in": 3}, coded={"key": {"latent": 2,
                                                                         "hidden": [4]}})
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.kind == "ranks+coded"
    assert Plan(2).key == Plan.from_json(Plan(2).to_json()).key
    with pytest.raises(GlpError, match="already compressed offline"):
        plan.offline({"1.query": 2})
    assert set(ROLES) < set(OFFLINE_ROLES)


def test_autoencoder_of_non_finite_weights_is_refused_as_diverged():
    model = tiny_model("bert")
    with torch.no_grad():
        matrices(model, ["key"])["0.key"].weight[0, 0] = float("nan")
    with pytest.raises(GlpError, match="diverged"):
        train_autoencoder(model, "key", AutoencoderConfig(ratio=2, epochs=1))


def test_autoencoder_keeps_the_epoch_with_the_lowest_reconstruction_loss(monkeypatch):
    """The epoch kept is the one whose decoded rows reconstruct best (no task data), and
    the model ends with its decoded weights."""
    import glp.methods.autoencoder.compress as compress

    measured = iter([0.5, 0.2, 0.4, 0.3])  # the epochs' reconstruction losses: epoch 2 wins
    real = compress._loss

    def loss(output, target, config):
        value = real(output, target, config)
        return value if torch.is_grad_enabled() else torch.tensor(next(measured))

    monkeypatch.setattr(compress, "_loss", loss)
    model = tiny_model("bert")
    seen = []
    coded = train_autoencoder(model, "value", AutoencoderConfig(ratio=2, epochs=4),
                              on_epoch=lambda epoch, total, value: seen.append(epoch))
    assert coded.losses == pytest.approx([0.5, 0.2, 0.4, 0.3]) and seen == [1, 2, 3, 4]
    assert coded.best_epoch == 2
    with torch.no_grad():  # the model ends with the winner's decoded weights
        rows = torch.cat([m.weight for m in matrices(model, ["value"]).values()])
    assert torch.allclose(rows, coded.decode())


def _ae_context(model, pretrained, dataset=None):
    from glp.methods import Context
    from glp.training.config import FineTuneConfig

    return Context(model=model, config=FineTuneConfig(batch_size=8, learning_rate=1e-2),
                   seed=0, pretrained=(lambda: copy.deepcopy(pretrained)) if pretrained
                   else None, load_train=lambda: dataset)


@pytest.mark.parametrize("decoder", ["nonlinear", "linear"])
def test_the_paper_protocol_compresses_the_pretrained_model_and_trains_the_codes(
        decoder, tmp_path):
    """finetune_epochs > 0: the pre-trained model is compressed, then fine-tuned with the
    codes and decoder (or the linear factors) trainable; the codes change, and the saved
    model reloads with glp.load_pretrained to the same outputs."""
    from glp.methods import get_method
    from glp.methods.autoencoder import AutoencoderParams
    from tests.glp.test_mlpruning import toy_dataset

    fine_tuned, pretrained = tiny_model("bert"), tiny_model("bert")
    with torch.no_grad():
        for param in pretrained.parameters():
            param.mul_(2.0)
    params = AutoencoderParams(ratio=2, modules=("query", "ffn_in"), decoder=decoder,
                               epochs=2, finetune_epochs=2)
    context = _ae_context(copy.deepcopy(fine_tuned), pretrained, toy_dataset(32))
    trained = {}
    import glp.methods.autoencoder.compress as compress

    real = compress.fine_tune_coded

    def recording(model, codes, *args):
        trained["before"] = {r: c.codes.clone() for r, c in codes.items()}
        trained["factors"] = {k: m.second.weight.detach().clone()
                              for k, m in matrices(model, ["query"]).items()
                              if isinstance(m, LowRankLinear)}
        return real(model, codes, *args)

    compress.fine_tune_coded = recording
    try:
        outcome = get_method("autoencoder").implementation()(context, params)
    finally:
        compress.fine_tune_coded = real
    model = outcome.model
    assert model is not context.model and not outcome.diverged
    assert [p["phase"] for p in outcome.phases] == ["query", "ffn_in", "finetune"]
    assert outcome.phases[-1]["examples"] == 64  # two epochs of the 32 rows
    if decoder == "nonlinear":
        after = getattr(model, CODES_ATTR)
        for role, before in trained["before"].items():
            assert not torch.equal(after[role].codes, before)  # the codes trained
            assert torch.allclose(torch.cat([m.weight for m in matrices(model, [role])
                                             .values()]), after[role].decode())
        assert not any("parametrizations" in n for n, _ in model.named_parameters())
    else:
        for key, before in trained["factors"].items():
            assert not torch.equal(matrices(model, ["query"])[key].second.weight, before)
    model.glp_plan = outcome.plan
    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m")
    assert torch.allclose(logits(loaded), logits(model), atol=1e-6)


def test_no_retraining_compresses_the_fine_tuned_model_in_place(tmp_path):
    """finetune_epochs 0 (the -offline variant): the fine-tuned model itself is coded,
    nothing trains on the task, and it reloads to the same outputs."""
    from glp.methods import get_method, trained_on_task
    from glp.methods.autoencoder import AutoencoderParams

    method = get_method("autoencoder")
    params = AutoencoderParams(ratio=2, modules=("key",), epochs=2, finetune_epochs=0)
    context = _ae_context(tiny_model("bert"), None)
    outcome = method.implementation()(context, params)
    assert outcome.model is context.model and not outcome.diverged
    assert trained_on_task(outcome.phases, 10) == (0.0, 0)
    outcome.model.glp_plan = outcome.plan
    save_pretrained(outcome.model, tmp_path / "m")
    assert torch.allclose(logits(load_pretrained(tmp_path / "m")), logits(outcome.model),
                          atol=1e-6)
    assert method.label(params) == "nonlinear-offline-ratio-2"
    assert method.suffix(params) == "-offline"
    assert method.suffix(AutoencoderParams(decoder="linear")) == "-linear"
    assert method.label(AutoencoderParams()) == "nonlinear-ratio-10"


def test_the_paper_protocol_needs_the_pretrained_model():
    from glp.methods import get_method
    from glp.methods.autoencoder import AutoencoderParams

    def given_fine_tuned():
        raise GlpError("the model DIR was given fine-tuned")

    run = get_method("autoencoder").implementation()
    context = _ae_context(tiny_model("bert"), None)
    context.pretrained = given_fine_tuned
    with pytest.raises(GlpError, match="given fine-tuned.*--ae-finetune-epochs 0"):
        run(context, AutoencoderParams(ratio=2, modules=("key",), epochs=1))
    assert {"train", "pretrained"} <= get_method("autoencoder").needs


def test_a_loaded_coded_model_saves_again_as_stored(tmp_path):
    model = tiny_model("bert")
    coded = train_autoencoder(model, "key", AutoencoderConfig(ratio=2, epochs=1))
    setattr(model, CODES_ATTR, {"key": coded})
    model.glp_plan = Plan(4).offline(coded={"key": {"latent": coded.latent,
                                                     "hidden": coded.hidden}})
    save_pretrained(model, tmp_path / "a")
    save_pretrained(load_pretrained(tmp_path / "a"), tmp_path / "b")
    assert stored_bytes(tmp_path / "b") == stored_bytes(tmp_path / "a")
    assert torch.allclose(logits(load_pretrained(tmp_path / "b")), logits(model), atol=1e-6)


def test_shared_factors_are_never_computed_per_matrix():
    model = tiny_model("bert")
    plan = Plan(4).offline({f"{i}.query": 4 for i in range(4)}, shared=["query"])
    with pytest.raises(GlpError, match="shared factor"):
        apply_plan(model, plan)  # factor="svd" cannot compute a factor shared by 4 layers
    with pytest.raises(GlpError, match="block-pruned and coded"):
        from glp.core.plan import BlockMask

        Plan(4, blocks={"0.key": BlockMask(16, 2, 2, "f")}, coded={"key": {"latent": 2}})
