"""The prepare stages as the tasks of an array, run in this process: N tasks give the documents,
ids, tokens, split and duplicate count of one machine's prepare; a task rerun is a no-op; a
half-written task redone gives the same corpus."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.errors import DataError
from data_pipeline.prepare_array import STAGES, init, missing_tasks, run_stage, work_dir
from data_pipeline.prepare_corpus import PrepareConfig, prepare
from helpers import make_text_corpus

GOLDEN = Path(__file__).parent / "golden" / "prepare_inputs"


def inputs(tmp: Path) -> tuple[str, ...]:
    """Text files, and a JSONL cut into several slices whose lines repeat across slices and files."""
    text = make_text_corpus(tmp / "text", n_docs=30, seed=5)
    rows = [(text / f"doc{i % 30:03d}.txt").read_text() for i in range(0, 90, 2)] + [f"row {i}\n" for i in range(60)]
    jsonl = tmp / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return str(text), str(jsonl), str(GOLDEN / "text"), str(GOLDEN / "docs.jsonl")


def opts(**kw) -> dict:
    return {"vocab_size": 300, "min_shards": 4, "val_fraction": 0.1, "workers": 1, "jsonl_slice_mb": 0.004, **kw}


def run_array(cfg: PrepareConfig, n_tasks: int) -> dict:
    assert init(cfg, n_tasks)
    for stage in STAGES:
        for task in missing_tasks(cfg, stage, n_tasks):
            run_stage(cfg, stage, task, n_tasks)
    return json.loads((cfg.out / "manifest.json").read_text())


def docs_with_sources(data: Path, split: str) -> dict[int, tuple]:
    import webdataset as wds

    m = json.loads((data / "manifest.json").read_text())
    out = {}
    for s in m["splits"][split]:
        for x in wds.WebDataset(str(data / s["file"]), shardshuffle=False, nodesplitter=None, workersplitter=None):
            out[int(x["__key__"][3:])] = (x["source.txt"].decode(), x[f"ids.{m['dtype']}"])
    return out


@pytest.mark.parametrize("extra", [{}, {"max_docs": 70, "val_fraction": 0.001}, {"tokenizer_sample_mb": 0.02}])
def test_four_tasks_make_the_corpus_of_one_machine(tmp_path, extra):
    ins = inputs(tmp_path)
    one = prepare(PrepareConfig(out=tmp_path / "one", inputs=ins, **opts(**extra)))
    four = run_array(PrepareConfig(out=tmp_path / "four", inputs=ins, **opts(**extra)), 4)
    assert four["totals"]["train"]["documents"] == one["totals"]["train"]["documents"]
    assert four["totals"]["validation"] == {**one["totals"]["validation"], "shards": four["totals"]["validation"]["shards"]}
    assert four["duplicates_dropped"] == one["duplicates_dropped"] > 0
    assert four["skipped"] == one["skipped"] and four["tokenizer"]["sha256"] == one["tokenizer"]["sha256"]
    for split in ("train", "validation"):
        assert docs_with_sources(tmp_path / "four", split) == docs_with_sources(tmp_path / "one", split)
    assert len(four["splits"]["train"]) >= 4 and not work_dir(PrepareConfig(out=tmp_path / "four")).root.exists()
    assert sum(1 for _ in json.loads((tmp_path / "four" / "manifest.json").read_text())["splits"]["train"]) == \
        four["totals"]["train"]["shards"]


def test_a_killed_task_redone_gives_the_same_corpus_and_finished_tasks_are_not_redone(tmp_path):
    ins = inputs(tmp_path)
    ref = run_array(PrepareConfig(out=tmp_path / "ref", inputs=ins, **opts()), 3)
    cfg = PrepareConfig(out=tmp_path / "again", inputs=ins, **opts())
    assert init(cfg, 3)
    for stage in ("scan", "plan"):
        for task in missing_tasks(cfg, stage, 3):
            run_stage(cfg, stage, task, 3)
    run_stage(cfg, "encode", 0, 3)
    run_stage(cfg, "encode", 2, 3)
    # task 1 "died" half way: a shard of it exists, its marker does not
    (cfg.out / "train-t0001-000000.tar").write_bytes(b"half a tar")
    assert init(cfg, 3)  # a resubmission with the same options is accepted ...
    assert missing_tasks(cfg, "scan", 3) == [] and missing_tasks(cfg, "encode", 3) == [1]  # ... and redoes task 1 only
    run_stage(cfg, "encode", 1, 3)
    run_stage(cfg, "merge", 0, 3)
    assert work_dir(cfg).encode_marker(0).exists() is False  # the work directory is gone after the merge
    m = json.loads((cfg.out / "manifest.json").read_text())
    # the same shard files with the same documents (sha256 differ: tar headers hold the write time)
    layout = lambda man: {k: [(s["file"], s["documents"], s["tokens"]) for s in v] for k, v in man["splits"].items()}  # noqa: E731
    assert layout(m) == layout(ref)
    for split in ("train", "validation"):
        assert docs_with_sources(cfg.out, split) == docs_with_sources(tmp_path / "ref", split)
    assert not init(cfg, 3)  # a rerun of the finished prepare has nothing to do
    assert run_stage(cfg, "scan", 0, 3) is None


def test_a_work_dir_of_other_options_is_refused(tmp_path):
    ins = inputs(tmp_path)
    cfg = PrepareConfig(out=tmp_path / "o", inputs=ins, **opts())
    assert init(cfg, 2)
    with pytest.raises(DataError, match="unfinished prepare with other options"):
        init(PrepareConfig(out=tmp_path / "o", inputs=ins, **opts(seed=1)), 2)
    with pytest.raises(DataError, match="not initialised for these options and --tasks 3"):
        run_stage(cfg, "scan", 0, 3)


def test_an_array_overwrite_replaces_only_the_corpus(tmp_path):
    ins = inputs(tmp_path)
    out = tmp_path / "o"
    run_array(PrepareConfig(out=out, inputs=ins, **opts()), 2)
    (out / "NOTES.md").write_text("mine")
    with pytest.raises(DataError, match="made with other options; pass --overwrite"):
        init(PrepareConfig(out=out, inputs=ins, **opts(seed=1)), 2)
    m = run_array(PrepareConfig(out=out, inputs=ins, overwrite=True, **opts(seed=1)), 2)
    assert m["seed"] == 1 and (out / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(s["file"] for v in m["splits"].values() for s in v)


def test_the_work_dir_is_removed_only_when_it_holds_our_record(tmp_path, caplog):
    from data_pipeline.prepare_array import remove_work_dir
    from data_pipeline.prepare_stages import WorkDir

    theirs = WorkDir(tmp_path / "out" / ".prepare-work")
    theirs.root.mkdir(parents=True)
    (theirs.root / "keep.txt").write_text("not ours")
    with caplog.at_level("WARNING"):
        remove_work_dir(theirs)
    assert (theirs.root / "keep.txt").read_text() == "not ours" and "left" in caplog.text
    (theirs.root / "config.json").write_text(json.dumps({"fingerprint": "x", "tasks": 1}))  # as init writes it
    remove_work_dir(theirs)  # ours now, but keep.txt is not: only the stages' files go
    assert (theirs.root / "keep.txt").read_text() == "not ours" and not (theirs.root / "config.json").exists()
    ours = WorkDir(tmp_path / "out2" / ".prepare-work")
    for path in (ours.units(), ours.scan_marker(0), ours.records(1),
                 ours.scan_dir() / "part-0000-0f.bin", ours.plan_marker(), ours.duplicates(0), ours.sample(0),
                 ours.tokenizer(), ours.encode_marker(0), ours.spool(0, "train"), ours.root / "plan.json.tmp123"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    (ours.scan_dir() / "notes.md").write_text("a user's")  # in one of our subdirectories
    (ours.root / "config.json").write_text(json.dumps({"fingerprint": "x", "tasks": 1}))
    remove_work_dir(ours)
    assert sorted(p.relative_to(ours.root).as_posix() for p in ours.root.rglob("*")) == ["scan", "scan/notes.md"]
    (ours.scan_dir() / "notes.md").unlink()
    (ours.root / "config.json").write_text(json.dumps({"fingerprint": "x", "tasks": 1}))
    remove_work_dir(ours)
    assert not ours.root.exists()
