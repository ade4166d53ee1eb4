"""memgpt-prepare as a Slurm job array on the real local two-node cluster: a 4-task array makes
the corpus one machine makes (same documents, ids, sources, tokens, counts and duplicates
dropped), its tasks run on both nodes, and a task killed mid-run is redone alone by resubmitting
the same command, with the same result."""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.prepare_corpus import PrepareConfig, prepare
from helpers import ROOT, make_text_corpus

TASKS = 4
OPTIONS = ["--vocab-size", "300", "--min-shards", "4", "--val-fraction", "0.1", "--jsonl-slice-mb", "0.5"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """Text files and a 2 MB JSONL (4 slices) whose rows repeat each other and the text files."""
    base = tmp_path_factory.mktemp("prepare_inputs")
    text = make_text_corpus(base / "text", n_docs=40, seed=11)
    rng = random.Random(0)
    words = [f"v{i}" for i in range(300)]
    rows = [" ".join(rng.choice(words) for _ in range(rng.choice([50, 400, 1500]))) for _ in range(700)]
    rows += [rows[i] for i in range(0, 700, 9)] + [(text / f"doc{i:03d}.txt").read_text() for i in range(0, 40, 4)]
    jsonl = base / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return [str(text), str(jsonl)]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """The same inputs prepared on this machine, in this process."""
    out = tmp_path_factory.mktemp("reference") / "corpus"
    prepare(PrepareConfig(out=out, inputs=tuple(inputs), vocab_size=300, min_shards=4, val_fraction=0.1, workers=1))
    return out


def submit(env: dict, inputs: list[str], out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/slurm/submit.py", "prepare", "--tasks", str(TASKS),
                           "--cpus-per-task", "1", "--time", "15", "--log-dir", str(out.parent / "logs"), *extra,
                           "--", *inputs, "--out", str(out), *OPTIONS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def job_of(stage: str, stdout: str) -> str:
    return re.search(rf"{stage}: job (\d+)", stdout).group(1)


def state(env: dict, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return m.group(1) if (m := re.search(r"JobState=(\S+)", out)) else "GONE"


def wait_state(env: dict, job: str, wanted: set[str], timeout_s: float = 300) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if (s := state(env, job)) in wanted:
            return s
        time.sleep(0.1)
    raise AssertionError(f"job {job} never reached {wanted} (last {state(env, job)})")


def corpus(data: Path) -> dict:
    """Everything that must match: per split, doc id -> (source, token bytes); the counts."""
    import webdataset as wds

    m = json.loads((data / "manifest.json").read_text())
    docs = {}
    for split, shards in m["splits"].items():
        docs[split] = {}
        for s in shards:
            for x in wds.WebDataset(str(data / s["file"]), shardshuffle=False, nodesplitter=None,
                                    workersplitter=None):
                docs[split][x["__key__"]] = (x["source.txt"], x[f"ids.{m['dtype']}"])
    counts = {k: {"documents": v["documents"], "tokens": v["tokens"]} for k, v in m["totals"].items()}
    return {"docs": docs, "counts": counts, "duplicates": m["duplicates_dropped"], "skipped": m["skipped"],
            "tokenizer": m["tokenizer"]["sha256"]}


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted((out.parent / "logs").glob("*.out")))


def test_a_four_task_array_makes_the_corpus_of_one_machine(slurm_env, inputs, reference, tmp_path):
    out = tmp_path / "corpus"
    proc = submit(slurm_env, inputs, out, "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs(out)
    assert "scan: job" in proc.stdout and "(array tasks 0,1,2,3)" in proc.stdout
    got, want = corpus(out), corpus(reference)
    assert want["duplicates"] > 0 and got == want
    m = json.loads((out / "manifest.json").read_text())
    assert m["prepare_tasks"] == TASKS and {s["file"][:11] for s in m["splits"]["train"]} >= \
        {f"train-t{t:04d}" for t in range(TASKS)}
    assert not (out / ".prepare-work").exists()
    scan_logs = logs(out)
    assert "on node node1] prepare scan" in scan_logs and "on node node2] prepare scan" in scan_logs
    again = submit(slurm_env, inputs, out)  # the same command once more: nothing to do
    assert again.returncode == 0 and "nothing to submit" in again.stdout


def kill_encode_task_mid_run(env: dict, inputs: list[str], out: Path, task: int) -> bool:
    """Submit the array and SIGKILL encode task `task` once it is writing its spool (interpreter up,
    tokenizer loaded, documents being read). False when the task finished before the kill landed
    (a fast machine can tokenize a slice within the poll): the caller tries again."""
    first = submit(env, inputs, out)
    assert first.returncode == 0, first.stderr
    encode, merge = job_of("encode", first.stdout), job_of("merge", first.stdout)
    work = out / ".prepare-work" / "encode"
    marker, spools = work / f"encode-{task:04d}.json", f"spool-{task:04d}-*.bin"
    deadline = time.time() + 300
    # The file system, not scontrol, is polled: it answers in microseconds, so the kill lands
    # while the spool is open instead of a second after the task began.
    while not (any(work.glob(spools)) or marker.exists()):
        assert time.time() < deadline, f"encode task {task} never started\n" + logs(out)
        time.sleep(0.005)
    subprocess.run(["scancel", "--signal=KILL", f"{encode}_{task}"], env=env, check=True)
    if wait_state(env, merge, {"CANCELLED", "GONE", "FAILED", "COMPLETED"}) == "COMPLETED":
        return False
    return not marker.exists()


def test_a_killed_task_is_redone_alone_and_the_corpus_is_the_same(slurm_env, inputs, reference, tmp_path):
    for attempt in range(3):
        out = tmp_path / f"attempt{attempt}" / "corpus"
        if kill_encode_task_mid_run(slurm_env, inputs, out, task=1):
            break
    else:
        raise AssertionError("encode task 1 finished before each of 3 kills: the drill did not kill anything")
    assert not (out / "manifest.json").exists()
    second = submit(slurm_env, inputs, out, "--wait")
    assert second.returncode == 0, second.stdout + second.stderr + logs(out)
    assert "scan:" not in second.stdout and "plan:" not in second.stdout  # those finished the first time
    assert "encode: job" in second.stdout and "(array tasks 1)" in second.stdout
    assert corpus(out) == corpus(reference)
