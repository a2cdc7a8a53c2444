"""The code of every registered text-in version (MLflow's models from code).

MLflow stores this file with each version and runs it where the version is served;
``glp/deploy/text_model.py`` travels with it as the version's code, so serving needs
onnxruntime, tokenizers and MLflow, and neither glp, torch nor transformers. Nothing is
pickled: the version is this code, the ONNX graph and the tokenizer's JSON.
"""

import importlib

import mlflow.pyfunc
from mlflow.models import set_model


class ServedTextModel(mlflow.pyfunc.PythonModel):
    """Text in (a ``text`` column, and ``text_pair`` for a pair task, or a list of
    strings), label and score out (``value`` for regression). The columns are the
    version's signature; MLflow's "add type hints" warning at load time is harmless."""

    def load_context(self, context):
        text_model = importlib.import_module("text_model")  # the version's own copy
        self.model = text_model.TextModel(context.artifacts["text_model"])

    def predict(self, context, model_input, params=None):
        return self.model.predict_frame(model_input)


set_model(ServedTextModel())
