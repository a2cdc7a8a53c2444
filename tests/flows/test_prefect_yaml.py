"""prefect.yaml's deployments agree with the flows' parameters and the methods' own."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

SPEC = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
PARAMS = {"flows/prune.py:prune": "flows.prune:PruneParams",
          "flows/compare.py:compare": "flows.compare:CompareParams",
          "flows/compress.py:compress": "flows.compress:CompressParams"}


def _params_class(entrypoint: str):
    module, _, name = PARAMS[entrypoint].partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_every_deployment_parameter_is_a_field_with_a_valid_value(deployment):
    cls = _params_class(deployment["entrypoint"])
    values = deployment["parameters"]["params"]
    unknown = set(values) - set(cls.model_fields)
    assert not unknown, f"{deployment['name']}: {unknown} are not {cls.__name__} fields"
    params = cls(**values)  # pydantic validates every value
    if hasattr(params, "method"):  # a method's own options, by its parameter dataclass
        from flows.compress import check_method

        method, configs = check_method(params)
        assert configs and all(isinstance(c, method.params) for c in configs)


def test_every_flow_has_a_scheduled_deployment():
    scheduled = {d["entrypoint"] for d in SPEC["deployments"] if d.get("schedules")}
    assert scheduled == set(PARAMS)
