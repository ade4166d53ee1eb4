"""The layering rule: the model and the data pipeline import neither torch.distributed nor deepspeed."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch.distributed", "deepspeed")


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def forbidden_uses(source: str) -> list[str]:
    """Forbidden imports (`import x`, `from x import y`, `from torch import distributed`) and
    attribute uses such as `torch.distributed.all_reduce`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if _is_forbidden(node.module) or _is_forbidden(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if _is_forbidden(f"{node.value.id}.{node.attr}"):
                found.append(f"{node.value.id}.{node.attr}")
    return found


def test_detector_catches_each_form():
    for bad in ("import deepspeed", "import torch.distributed as dist", "from torch import distributed",
                "from deepspeed.runtime import zero", "import torch\ntorch.distributed.barrier()"):
        assert forbidden_uses(bad), bad
    assert not forbidden_uses('"""Imports torch only: no torch.distributed, no deepspeed."""\nimport torch')


def test_model_and_data_pipeline_do_not_import_distributed_code():
    files = [p for d in ("memgpt_dist/model", "data_pipeline") if (ROOT / d).is_dir()
             for p in sorted((ROOT / d).rglob("*.py"))]
    assert any(p.parent.name == "model" for p in files)
    offenders = {str(p.relative_to(ROOT)): uses for p in files if (uses := forbidden_uses(p.read_text()))}
    assert offenders == {}
