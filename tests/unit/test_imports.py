"""The dependency direction of DESIGN.md, and a cheap `import fabric`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "fabric"

BASE = {"errors", "config", "storage"}
# component -> components it may import (lazily or not); pipeline and cli may import everything.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_console": set(),  # the `fabric` logger's stdout handler, installed by fabric/__init__.py
    "config": {"errors"},
    "storage": {"errors"},  # run_dir as a local path or a filesystem URI: every component may use it
    "runtime": BASE,
    "tracking": BASE | {"runtime"},
    "data": BASE | {"runtime", "tracking"},
    "models": BASE | {"runtime", "tracking"},
    "train": BASE | {"runtime", "tracking", "data", "models"},
    "tune": BASE | {"runtime", "tracking", "data", "models", "train"},
    "export": BASE | {"runtime", "tracking", "models"},
    "monitor": BASE | {"runtime", "data"},
    "serve": BASE | {"runtime", "tracking", "data", "models", "export", "monitor"},
    "evaluate": BASE | {"runtime", "tracking"},
    "predict": BASE | {"runtime", "tracking", "export", "data"},
}
LEAVES = ("jobs", "notebooks", "benchmarks")
HEAVY = ("torch", "vllm", "deepspeed", "mlflow", "wandb", "transformers", "evidently", "ray", "optuna", "onnxruntime")


def _component(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if rel.parts[0] != "__init__.py" else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def test_components_import_only_downstream() -> None:
    bad = []
    for path in PKG.rglob("*.py"):
        comp = _component(path)
        if comp in ("pipeline", "cli"):
            continue
        allowed = ALLOWED.get(comp, {"errors", "_console"} if comp == "__init__" else None)
        assert allowed is not None, f"{path}: component {comp!r} is missing from the import-direction table"
        for line, mod in _imports(path):
            parts = mod.split(".")
            if parts[0] == "fabric" and len(parts) > 1:
                target = parts[1]
                if target != comp and target not in allowed:
                    bad.append(f"{path.relative_to(ROOT)}:{line} ({comp}) imports fabric.{target}")
            if parts[0] in LEAVES:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the leaf {parts[0]}/")
    assert not bad, "imports against DESIGN.md's direction:\n" + "\n".join(bad)


def test_leaves_import_no_other_leaf() -> None:
    bad = []
    for leaf in LEAVES:
        for path in (ROOT / leaf).rglob("*.py"):
            for line, mod in _imports(path):
                if mod.split(".")[0] in LEAVES and mod.split(".")[0] != leaf:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_import_fabric_and_help_load_nothing_heavy() -> None:
    code = (
        "import sys, fabric, fabric.config, fabric.cli; fabric.cli.build_parser(); "
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`import fabric` / `fabric --help` loaded: {out.stdout.strip()}"


def test_every_script_parses_on_this_python() -> None:
    """jobs/ and benchmarks/ are never imported by the suite: at least make sure they compile here."""
    for leaf in ("jobs", "benchmarks"):
        for path in (ROOT / leaf).rglob("*.py"):
            compile(path.read_text(), str(path), "exec")
