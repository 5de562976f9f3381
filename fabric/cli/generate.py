"""`fabric generate`: batch generation with vLLM on Ray Data, from a prompts file to an output file.

    fabric generate jobs/configs/llm_serve_smoke.yaml --input prompts.jsonl --output out.parquet
    fabric generate my.yaml --input s.parquet --output g.jsonl llm.generate.max_tokens=128 llm.generate.adapter=ft

The model is ``llm.serve``'s (its folder, adapters and vLLM settings); ``llm.generate`` holds the prompt and id
columns and the sampling. Without a cluster, a local Ray is started here and ends with the command.
"""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `fabric generate`."""
    p.add_argument("config", nargs="?", help="pipeline YAML with llm.serve (the model) and llm.generate sections")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. llm.generate.max_tokens=128")
    p.add_argument("--input", help="prompts: .jsonl, .parquet or .csv (sets llm.generate.input)")
    p.add_argument("--output", help="where generations go: .parquet, .jsonl or .csv (sets llm.generate.output)")


def run(args: argparse.Namespace) -> int:
    """Check the input, generate, print what was written."""
    from fabric.cli import config_and_overrides
    from fabric.config import load_config
    from fabric.errors import DataValidationError, UsageError
    from fabric.predict import check_input, generate
    from fabric.runtime import connect
    from fabric.serve.llm.app import resolved

    extra = [f"llm.generate.{k}={v}" for k, v in (("input", args.input), ("output", args.output)) if v]
    config, overrides = config_and_overrides(args)
    cfg = load_config(config, [*overrides, *extra])
    g = cfg.llm.generate
    try:  # a bad input file is bad input (exit 2), found before any work
        check_input(g.input or "", g.prompt_field, g.id_fields)
    except DataValidationError as e:
        raise UsageError(str(e)) from None
    connect(cfg.cluster)
    result = generate(cfg, resolved(cfg)["model_path"])
    print(
        f"generate: {result.rows} prompts -> {result.output} ({result.generated_tokens} tokens, "
        f"{result.seconds:.1f} s, {result.generated_tokens / max(result.seconds, 1e-9):.1f} tokens/s)",
        flush=True,
    )
    return 0
