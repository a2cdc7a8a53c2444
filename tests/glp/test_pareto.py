"""The cross-method report's logic: the frontier, the speed-up buckets, the sentences."""

from __future__ import annotations

import math

from glp.report.pareto import buckets, frontier, method_of, sentences, size_of, speedups
from glp.report.pick import Model


def _model(strategy, mean, latency, *, std=0.01, method="layers", variant="", depth=6,
           parameters=100, **extra) -> Model:
    return Model(job_id="j", strategy=strategy, variant=variant, method=method, model="m",
                 task="sst2", metric="accuracy", depth=depth, plan={}, mean=mean, std=std,
                 seeds=3, parameters=parameters, latency_ms=latency, latency_batch=32,
                 speedup=None, chosen_seed=40, model_dir="/d", extra=extra)


def test_the_frontier_keeps_what_nothing_beats():
    points = [(10, 0.9), (5, 0.8), (6, 0.85), (7, 0.8), (2, 0.5), (3, 0.5), (math.nan, 1.0)]
    assert frontier(points) == [4, 1, 2, 0]  # (7, 0.8) and (3, 0.5) are beaten


def test_buckets_take_the_best_metric_among_the_fast_enough():
    models = [_model("unpruned", 0.90, 60.0),
              _model("greedy", 0.88, 30.0, depth=3),  # 2x
              _model("top", 0.85, 20.0, depth=2),  # 3x
              _model("mlpruning", 0.89, 40.0, method="mlpruning", variant="density-50",
                     target_density=0.5),  # 1.5x
              _model("greedy", 0.60, 9.0, depth=1)]  # 6.7x
    fast = speedups(models)
    assert fast[1] == 2.0 and fast[0] == 1.0
    found = {b["threshold"]: b for b in buckets(models)}
    assert found[1.5]["best"].method == "mlpruning" and found[1.5]["candidates"] == 4
    assert found[1.5]["runner_up"].strategy == "greedy"
    assert found[2.0]["best"].strategy == "greedy" and found[2.0]["speedup"] == 2.0
    assert found[3.0]["best"].strategy == "top"
    assert found[6.0]["best"].depth == 1 and found[6.0]["runner_up"] is None


def test_sentences_name_the_winner_its_spread_and_whether_it_is_clearly_ahead():
    models = [_model("unpruned", 0.90, 60.0), _model("greedy", 0.88, 30.0, depth=3),
              _model("top", 0.80, 28.0, depth=3), _model("bottom", 0.879, 29.0, depth=3)]
    lines = sentences(models, "accuracy")
    two = next(line for line in lines if line.startswith("At ≥2×"))
    assert "**greedy** (3 layers, 2.00×)" in two and "0.8800 ± 0.0100 (3 seeds)" in two
    assert "0.0200 below the unpruned model (0.9000 ± 0.0100 (3 seeds))" in two
    assert "within the seed spread of bottom" in two  # 0.001 apart, spreads 0.01 each
    assert lines[0].startswith("At ≥1.5×")
    assert next(line for line in lines if line.startswith("At ≥3×")) == \
        "At ≥3× no model is that fast."
    clear = sentences([models[0], models[1], models[2]], "accuracy")
    assert "clearly ahead of top" in next(line for line in clear if line.startswith("At ≥2×"))


def test_names_and_sizes_read_as_a_user_asked():
    composed = _model("greedy+lowrank", 0.8, 10.0, method="greedy+lowrank", depth=4,
                      variant="svd-ratio-4", target_ratio=4.0)
    assert method_of(composed) == "greedy+lowrank" and size_of(composed) == "ratio 4, 4 layers"
    assert method_of(_model("greedy", 0.8, 10.0, variant="kd", depth=4)) == "greedy (kd)"
    width = _model("mlpruning", 0.8, 10.0, method="mlpruning", variant="density-30",
                   target_density=0.3)
    assert method_of(width) == "mlpruning" and size_of(width) == "density 0.3"


def test_the_report_names_each_bucket_winner_where_it_lies(tmp_path):
    from glp.report.pareto import write_methods_report

    home = tmp_path / "home"
    models = [_model("unpruned", 0.90, 60.0), _model("greedy", 0.88, 30.0, depth=3)]
    models[1] = Model(**{**models[1].__dict__, "model_dir": str(home / "artifacts" / "m")})
    paths = write_methods_report(tmp_path / "out", models, "accuracy", home=home,
                                 command="glp compare --methods greedy")
    text = paths["methods"].read_text()
    assert "`artifacts/m` (in the run home)" in text and str(home) not in text
    assert "Made by `glp compare --methods greedy`." in text
    assert paths["pareto_latency"].read_bytes()[:4] == b"\x89PNG"
    assert len(paths["methods_csv"].read_text().splitlines()) == 3


def test_one_seed_reads_1_seed_in_the_report_never_a_spread_of_zero(tmp_path):
    from glp.report.pareto import table, write_methods_report

    models = [_model("unpruned", 0.90, 60.0), _model("greedy", 0.88, 30.0, depth=3)]
    models = [Model(**{**m.__dict__, "seeds": 1, "std": 0.0}) for m in models]
    two = next(line for line in sentences(models, "accuracy") if line.startswith("At ≥2×"))
    assert "0.8800 (1 seed)" in two and "(0.9000 (1 seed))" in two
    assert [row[2] for row in table(models, "accuracy")] == ["0.8800 (1 seed)",
                                                             "0.9000 (1 seed)"]
    text = write_methods_report(tmp_path, models, "accuracy")["methods"].read_text()
    assert "± 0.0000" not in text and "| 0.8800 (1 seed) |" in text


def test_a_lead_from_extra_training_is_never_called_a_lead():
    """A width model trained 3 epochs in all (its 1-epoch teacher included) beats the
    1-epoch reference; the sentence holds it against the unpruned model trained 3 epochs
    when the comparison has one, and otherwise says the budgets differ."""
    reference = _model("unpruned", 0.835, 60.0, train_epochs=1.0, train_steps=16)
    width = _model("mlpruning", 0.946, 20.0, method="mlpruning", variant="density-30",
                   target_density=0.3, train_epochs=3.0, train_steps=48)
    equal = _model("unpruned-equal", 0.95, 60.0, method="unpruned", train_epochs=3.0,
                   train_steps=48)
    alone = sentences([reference, width], "accuracy")[0]
    assert "0.1110 above the unpruned model trained 1 epoch in all against its 3" in alone
    assert "not an equal budget" in alone
    fair = sentences([reference, width, equal], "accuracy")[0]
    assert "0.0040 below the unpruned model trained as long" in fair
    assert "not an equal budget" not in fair
    assert all(b["best"] is None or b["best"].strategy == "mlpruning"
               for b in buckets([reference, width, equal]))  # never a bucket's winner
    assert method_of(equal) == "unpruned-equal"


def test_a_methods_training_counts_the_phases_on_the_task_data():
    from glp.methods import trained_on_task

    phases = [{"phase": "heads+neurons", "steps": 10, "examples": 320},
              {"phase": "query", "steps": 5},  # an autoencoder on weight rows: not counted
              {"phase": "fine-tune", "steps": 5, "examples": 160}]
    assert trained_on_task(phases, 160) == (3.0, 15)
    assert trained_on_task([], 160) == (0.0, 0)


def test_the_headline_is_int8_against_unpruned_int8_and_int8_costs_are_said(tmp_path):
    """Deployed in int8: the int8 graphs' own scores and latencies, against the unpruned
    int8 graph; a model whose int8 graph loses more than its seed spread is named."""
    import dataclasses

    from glp.report.pareto import headline, int8_costs, write_methods_report

    def deployed(model, int8_mean, int8_b32):
        return dataclasses.replace(model, int8_mean=int8_mean, int8_std=0.005,
                                   extra={**model.extra, "int8_b32_ms": int8_b32})

    models = [deployed(_model("unpruned", 0.90, 60.0), 0.895, 20.0),
              # 2x in PyTorch, but its int8 graph is only 1.25x the unpruned int8 graph
              deployed(_model("greedy", 0.88, 30.0, depth=3), 0.879, 16.0),
              # 1.5x in PyTorch, 2x in int8; its int8 graph loses 0.05 (spread 0.01)
              deployed(_model("mlpruning", 0.89, 40.0, method="mlpruning",
                              variant="density-50", target_density=0.5), 0.84, 10.0)]
    int8 = headline(models)
    assert [round(m.mean, 3) for m in int8] == [0.895, 0.879, 0.84]
    assert [m.speedup for m in int8] == [1.0, 1.25, 2.0]
    best = {b["threshold"]: b["best"] for b in buckets(int8)}
    assert best[2.0].method == "mlpruning" and best[1.5].method == "mlpruning"
    costs = int8_costs(models)
    assert len(costs) == 1 and "**mlpruning** (density 0.5) 0.0500" in costs[0]
    text = write_methods_report(tmp_path, models, "accuracy")["methods"].read_text()
    assert "## Which method wins where, deployed in int8" in text
    assert "At ≥2×: **mlpruning** (density 0.5, 2.00×) with accuracy 0.8400" in text
    assert "## Against PyTorch eager" in text and "## What int8 costs" in text
    # no int8 timing of the unpruned model: no int8 headline, said so
    plain = [dataclasses.replace(m, int8_mean=None, extra={}) for m in models]
    assert headline(plain) == []
    assert "no int8 headline" in write_methods_report(tmp_path / "p", plain,
                                                      "accuracy")["methods"].read_text()


def test_an_int8_cost_counts_only_beyond_the_larger_seed_spread():
    """The layer report's rule (glp.report.tables): a difference counts when it is larger
    than the larger of the two sample standard deviations (here fp32's and int8's).
    MRPC's unpruned model: fp32 0.8330 ± 0.0046, int8 0.8283 ± 0.0069."""
    import dataclasses

    from glp.report.pareto import int8_costs

    model = dataclasses.replace(_model("unpruned", 0.8330, 60.0, std=0.0046),
                                int8_mean=0.8283, int8_std=0.0069)
    assert int8_costs([model]) == [
        "int8 costs no model more than its seed spread; the largest change is unpruned "
        "(6 layers), -0.0047 in int8 (within its seed spread)."]
    beyond = dataclasses.replace(model, int8_mean=0.8250)  # a cost of 0.0079 > 0.0069
    assert "more than the seed spread" in int8_costs([beyond])[0]
