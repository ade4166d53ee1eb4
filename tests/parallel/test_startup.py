"""Start-up: config and run-directory mistakes fail before DeepSpeed is imported, a line precedes
DeepSpeed's first-start build, builds are cached per virtualenv, one warnings filter."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from helpers import ROOT, cli_env
from memgpt_dist.config import ConfigError
from memgpt_dist.parallel import startup
from memgpt_dist.parallel.preflight import check_run_dir

PROBE = ("import sys; from launch.train import main; rc = main(sys.argv[1:]); "
         "print('rc', rc, 'deepspeed imported', 'deepspeed' in sys.modules)")


def test_a_run_dir_that_is_a_file_fails_before_deepspeed_is_imported(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a directory")
    proc = subprocess.run([sys.executable, "-c", PROBE, "--config", "configs/tiny.yaml", f"--run_dir={run_dir}"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert "rc 2 deepspeed imported False" in proc.stdout, proc.stdout + proc.stderr
    assert f"run_dir={run_dir} is a file" in proc.stderr


def test_a_layout_that_does_not_fit_the_world_fails_before_deepspeed_is_imported():
    env = {**cli_env(), "WORLD_SIZE": "3"}
    proc = subprocess.run([sys.executable, "-c", PROBE, "--config", "configs/tiny.yaml", "--parallel.tp=2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "rc 2 deepspeed imported False" in proc.stdout, proc.stdout + proc.stderr
    assert "parallel.tp" in proc.stderr


def test_check_run_dir_accepts_new_and_existing_directories(tmp_path):
    check_run_dir(tmp_path / "new" / "run")
    check_run_dir(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        check_run_dir(tmp_path / "f")


def test_the_build_is_announced_only_when_nothing_is_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    startup.announce_comm_op_build("cpu")
    assert startup.BUILD_NOTE in capsys.readouterr().err
    (tmp_path / startup.COMM_OP).mkdir()
    (tmp_path / startup.COMM_OP / f"{startup.COMM_OP}.so").write_bytes(b"")
    startup.announce_comm_op_build("cpu")
    startup.announce_comm_op_build("cuda")
    assert capsys.readouterr().err == ""


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    """A lock left by a killed build would make every later start wait forever."""
    import os
    import time

    build = tmp_path / startup.COMM_OP
    build.mkdir()
    lock = build / "lock"
    lock.write_bytes(b"")
    (build / "build.ninja").write_text("rule cxx")
    assert not startup.clear_stale_build_lock(build, stale_s=600)  # a build touched it just now
    assert lock.is_file()
    old = time.time() - 3600
    for p in build.iterdir():
        os.utime(p, (old, old))
    assert startup.clear_stale_build_lock(build, stale_s=600)
    assert not lock.exists() and (build / "build.ninja").is_file()  # only the lock goes
    assert not startup.clear_stale_build_lock(build, stale_s=600)  # nothing left to remove
    assert not startup.clear_stale_build_lock(tmp_path / "absent")


def test_builds_are_cached_under_the_virtualenv_unless_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert startup.extensions_dir() == Path(sys.prefix) / "torch_extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert startup.extensions_dir() == tmp_path


def test_only_deepspeeds_collective_deprecations_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        startup.silence_known_warnings()
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                      "`torch.distributed.reduce_scatter_single` instead.", FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                      "`torch.distributed.all_gather_single` instead.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
