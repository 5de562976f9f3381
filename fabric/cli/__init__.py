"""The `fabric` command line: one module per subcommand, each imported only when it runs.

Exit codes: 0 success, 1 the work failed (a job failed, the cluster is unreachable), 2 bad input
(a bad config, a missing file, a wrong argument) — always one readable line per problem, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from fabric import __version__
from fabric.cli import verbosity
from fabric.errors import ConfigError, FabricError, UsageError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("fabric.cli.up", "start a local Ray head for development (dashboard and job API on 127.0.0.1)"),
    "down": ("fabric.cli.down", "stop the Ray head that `fabric up` started (and only that)"),
    "status": ("fabric.cli.status", "nodes, resources, jobs and Serve applications of the cluster"),
    "submit": ("fabric.cli.submit", "submit a jobs/<stage>.py script as a Ray job and stream its logs"),
    "jobs": ("fabric.cli.jobs", "list Ray jobs, show their logs, stop one"),
    "validate": ("fabric.cli.validate", "check a pipeline config without running anything"),
    "run": ("fabric.cli.run", "run the whole pipeline from a config on the current Ray"),
    "tune": ("fabric.cli.tune", "run the hyperparameter search alone (--resume continues an interrupted one)"),
    "serve": ("fabric.cli.serve", "serve a model over HTTP (Open Inference Protocol v2); set-traffic, status"),
    "monitor": ("fabric.cli.monitor", "show the drift monitor's last result, or reset its window"),
    "finetune": (
        "fabric.cli.finetune",
        "fine-tune a causal LM with LoRA on Ray Train (DDP or DeepSpeed); outputs under <run_dir>/llm",
    ),
    "serve-llm": (
        "fabric.cli.serve_llm",
        "serve a language model over the OpenAI API (vLLM where installed, a batching CPU engine otherwise)",
    ),
    "generate": (
        "fabric.cli.generate",
        "batch generation: a prompts file through vLLM engines on Ray Data, to parquet, JSON lines or CSV",
    ),
    "predict": (
        "fabric.cli.predict",
        "batch scoring: a file or URI through a registered model (Ray Data tasks) to parquet or CSV",
    ),
    "eval-llm": (
        "fabric.cli.eval_llm",
        "lm-evaluation-harness against the served language model (base and adapters); scores to MLflow",
    ),
}


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


class _Parser(argparse.ArgumentParser):
    """argparse that ends with one readable line and exit code 2 on bad arguments."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The config path and overrides of ``args``; a first word that is an override, not a file, is one."""
    from pathlib import Path

    config, overrides = args.config, list(args.overrides)
    if config and _OVERRIDE.match(config) and not Path(config).exists():
        return None, [config, *overrides]
    return config, overrides


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each subcommand module adds its own arguments."""
    parser = _Parser(prog="fabric", description="The ML lifecycle as Ray workloads.")
    parser.add_argument("--version", action="version", version=f"fabric {__version__}")
    verbosity.add_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        verbosity.add_flag(sp, default=argparse.SUPPRESS)  # -v before or after the subcommand
        importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fabric` console script."""
    parser = build_parser()
    # Overrides (`section.field=value`) may come anywhere after the subcommand, even between options.
    args, extra = parser.parse_known_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    verbosity.configure(args.verbose, ray=args.command in verbosity.IN_PROCESS_RAY)
    module = importlib.import_module(COMMANDS[args.command][0])
    if extra:
        bad = [a for a in extra if not getattr(module, "ACCEPTS_OVERRIDES", False) or not _OVERRIDE.match(a)]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(getattr(args, "overrides", [])) + extra
    try:
        return int(module.run(args) or 0)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FabricError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
