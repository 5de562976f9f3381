"""Batch inference on Ray Data: language-model generation with vLLM engines, tabular scoring with a registered model.

* :func:`generate` — prompts (JSON lines, parquet, CSV) through ``ray.data.llm``'s vLLM processor to a file,
  with the input's id columns (``fabric generate``, ``jobs/generate.py``); :func:`check_input`
* :func:`score` — tabular rows (a file, folder or URI) through a registered model's ONNX graph in Ray Data
  tasks, checked against the model's input schema and the data expectations, to parquet or CSV
  (``fabric predict``, ``jobs/predict.py``)

Importing this package loads neither Ray nor vLLM.
"""

from fabric.predict._generate import GenerateResult, check_input, engine_kwargs, generate
from fabric.predict._tabular import ScoreResult, score

__all__ = ["GenerateResult", "ScoreResult", "check_input", "engine_kwargs", "generate", "score"]
