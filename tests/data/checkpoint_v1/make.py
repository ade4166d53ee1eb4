"""Writes the checkpoint in this directory with the code of commit c8771de (the last main before
the trainer/checkpointer split), so tests/train/test_old_checkpoint.py can check that the current
code still resumes it. Run from a checkout of that commit, e.g.:

    git worktree add /tmp/old c8771de && cp tests/data/checkpoint_v1/make.py /tmp/old/ &&
    (cd /tmp/old && python make.py OUT_DIR)

It trains 3 steps of the in-process test trainer (ZeRO-3, stream training), saves step 3, then
records the losses of steps 4 and 5 of the same, uninterrupted run in expected.json.
"""
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "tests" / "train"))

from inprocess import make_trainer  # noqa: E402
from memgpt_dist.parallel.dist import init_distributed  # noqa: E402

out = Path(sys.argv[1])
topo = init_distributed()
t = make_trainer(topo, out / "run", seed=1, stage=3, extra=("train.carry_memory=true",))
for _ in range(3):
    t.train_step()
t.save()
losses = [t.train_step().loss for _ in range(2)]
(out / "expected.json").write_text(json.dumps({"step": 3, "losses_after": losses}))
shutil.rmtree(out / "run" / "tensorboard", ignore_errors=True)
