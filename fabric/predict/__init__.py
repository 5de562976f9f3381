"""Batch inference on Ray Data: language-model generation over a prompts file with vLLM engines.

* :func:`generate` — prompts (JSON lines, parquet, CSV) through ``ray.data.llm``'s vLLM processor to a file,
  with the input's id columns (``fabric generate``, ``jobs/generate.py``); :func:`check_input`

Importing this package loads neither Ray nor vLLM.
"""

from fabric.predict._generate import GenerateResult, check_input, engine_kwargs, generate

__all__ = ["GenerateResult", "check_input", "engine_kwargs", "generate"]
