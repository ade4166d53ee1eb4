"""Launched on 2 ranks by test_pipeline.py: build the real PipelineModule (pp=2) for a few model
shapes and partition methods and print, from rank 0, the layer bounds DeepSpeed chose."""
import json
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist

from memgpt_dist.config import load_config
from memgpt_dist.parallel.pipeline import build_pipeline_module
from memgpt_dist.train.run import build_model

CASES = json.loads(Path(sys.argv[-1]).read_text())  # [[override, ...], ...]; the launcher puts --local_rank first

deepspeed.init_distributed(dist_backend="gloo")
out = []
for overrides in CASES:
    cfg = load_config(None, overrides)
    net, _ = build_pipeline_module(build_model(cfg), cfg.parallel, loss_fn=None)
    out.append([int(b) for b in net.parts])
if dist.get_rank() == 0:
    print("PARTS " + json.dumps(out), flush=True)
dist.destroy_process_group()
