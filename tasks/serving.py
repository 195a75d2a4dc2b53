"""MLflow ``pyfunc`` wrappers for the registered models, so that a new batch can be embedded and assigned later
with the ``@champion`` models (``mlflow.pyfunc.load_model("models:/<prefix>-embedder@champion")``).

- embedder: standardised ``uint8`` images ``(N, S, S)`` → vectors ``(N, d)`` (:class:`tasks.embedding.EmbeddingModel`).
- clusterer: vectors ``(N, d)`` → a DataFrame ``cluster, confidence, distance`` (:func:`tasks.clustering.assign`).

The fitted objects are artifacts (``model.pt``: tensors only; ``model.pkl``: numpy arrays); the ``tasks`` package is
logged beside them as code, so loading needs no checkout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow.pyfunc import PythonModel


class EmbedderModel(PythonModel):
    def load_context(self, context) -> None:
        from tasks.config import load_params
        from tasks.embedding import load_model

        self.model = load_model(Path(context.artifacts["model"]))
        params = context.artifacts.get("params")  # how the training images were standardised and validated
        self.params = load_params(Path(params)) if params else None

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate a schema
        images = np.asarray(model_input)
        if images.ndim == 2:
            images = images[None]
        return self.model.transform(images.astype(np.uint8))


class ClustererModel(PythonModel):
    def load_context(self, context) -> None:
        import joblib

        self.model = joblib.load(context.artifacts["model"])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would validate a schema
        import pandas as pd

        from tasks.clustering import assign

        result = assign(self.model, np.asarray(model_input, dtype=np.float32))
        return pd.DataFrame({"cluster": result.labels, "confidence": result.confidence, "distance": result.distance})
