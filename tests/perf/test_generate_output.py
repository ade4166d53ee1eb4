"""`memgpt-generate` prints the prompt and its continuation on stdout and nothing else: no DeepSpeed
start-up chatter (accelerator detection, op builds), which goes to stderr or nowhere."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from helpers import bin_path, run_cmd  # noqa: E402
from inprocess import make_trainer  # noqa: E402

from memgpt_dist.parallel.dist import init_distributed  # noqa: E402

PROMPT = "def w1 ("


def test_stdout_is_exactly_the_generated_text(tiny_data, tmp_path):
    from tokenizers import Tokenizer

    from memgpt_dist.generate import SamplingConfig, find_checkpoint, generate, load_model

    shutil.copyfile(tiny_data / "tokenizer.json", tmp_path / "tokenizer.json")
    trainer = make_trainer(init_distributed(), tmp_path, stage=3, extra=("model.vocab_size=320",))
    trainer.train_step()
    trainer.save()
    proc = run_cmd([bin_path("memgpt-generate"), "--checkpoint", str(tmp_path), "--prompt", PROMPT,
                    "--max-new-tokens", "12", "--seed", "3"])
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    model, _ = load_model(find_checkpoint(tmp_path))
    new_ids = generate(model, tokenizer.encode(PROMPT).ids, SamplingConfig(12, 0.8, 50, 0.95, 3),
                       eos_id=tokenizer.token_to_id("<|endoftext|>"))
    assert proc.stdout == PROMPT + tokenizer.decode(new_ids) + "\n", proc.stdout
