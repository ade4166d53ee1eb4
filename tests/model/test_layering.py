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


# ---------------------------------------------------------------- the house rules (issue 12)
def imported_modules(source: str) -> list[str]:
    """Every module an `import` or `from ... import` names, at any depth of the file."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def python_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]


def test_import_detector_sees_nested_and_from_imports():
    src = "def f():\n    from data_pipeline.tasks import x\nimport os, data_pipeline.loaders as l\n"
    assert sorted(imported_modules(src)) == ["data_pipeline.loaders", "data_pipeline.tasks", "os"]


def test_memgpt_dist_and_data_pipeline_do_not_import_each_other():
    """The two packages are wired together in launch/ only (loaders and task readers are built
    there, or by a data_pipeline factory, and passed in)."""
    def offenders(package: str, other: str) -> dict[str, list[str]]:
        return {str(p.relative_to(ROOT)): bad for p in python_files(package)
                if (bad := [m for m in imported_modules(p.read_text()) if m == other or m.startswith(other + ".")])}

    assert offenders("memgpt_dist", "data_pipeline") == {}
    assert offenders("data_pipeline", "memgpt_dist") == {}


def test_the_model_imports_only_torch_and_itself():
    allowed = ("torch", "memgpt_dist.model", "memgpt_dist.config", "__future__", "math", "typing", "dataclasses", "contextlib")
    bad = {str(p.relative_to(ROOT)): [m for m in imported_modules(p.read_text()) if not m.startswith(allowed)]
           for p in python_files("memgpt_dist/model")}
    assert {k: v for k, v in bad.items() if v} == {}


def calls_sys_exit(source: str) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "exit" and isinstance(n.value, ast.Name) and
               n.value.id == "sys" for n in ast.walk(ast.parse(source)))


def test_no_sys_exit_below_launch():
    assert calls_sys_exit("import sys\nsys.exit(2)") and not calls_sys_exit("import os\nos._exit(2)")
    offenders = [str(p.relative_to(ROOT)) for p in python_files("memgpt_dist", "data_pipeline")
                 if calls_sys_exit(p.read_text())]
    assert offenders == []


def test_no_benchmark_inside_the_library():
    assert not (ROOT / "memgpt_dist" / "streaming.py").exists()
    assert (ROOT / "benchmarks" / "streaming.py").is_file()


def test_entry_points_stay_thin():
    """launch/*.py parse arguments and wire components: about 80 lines (90 at most, for
    argument tables), no logic a library function could hold."""
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "launch").glob("*.py"))
            if (n := len(p.read_text().splitlines())) > 90}
    assert long == {}


def test_deepspeed_internals_are_reached_only_from_ds_compat():
    """Private DeepSpeed names (`deepspeed.x._y`, `groups._init...`, `engine._take_model_step`,
    `net._grid`) appear in memgpt_dist only inside parallel/ds_compat.py."""
    private = ("_init_tp_mesh_device", "_take_model_step", "_grid", "_build_param_uc_restore_meta",
               "_derive_affine_map", "first_dataloader_check", "_global_grad_norm", "checkpoint_engine")
    # attributes DeepSpeed reads that only ds_compat may set (reading them elsewhere is fine)
    assigned = {"ds_pipe_replicated"}
    found = {}
    for p in python_files("memgpt_dist"):
        if p.name == "ds_compat.py":
            continue
        names = {n.attr for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Attribute)} | \
                {a.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ImportFrom) for a in n.names}
        stores = {t.attr for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Attribute)}
        if hit := sorted((names & set(private)) | (stores & assigned)):
            found[str(p.relative_to(ROOT))] = hit
    assert found == {}
