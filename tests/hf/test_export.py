"""memgpt-export: a run becomes a transformers model (remote code) that equals the project's model.

The remote modeling file is a copy of memgpt_dist.model's math, so its logits are compared with
the GPT's for every model option; a ZeRO-3 run and a pipeline run are exported with the real CLI
and loaded back with AutoModelForCausalLM / AutoTokenizer, in this process and in one where the
project cannot be imported; generate() (greedy, sampled, left-padded batches) and lm_eval run on it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import ROOT, bin_path, cli_env, run_cmd, tiny_args, train
from memgpt_dist.config import MemoryConfig, ModelConfig, TrainConfig
from memgpt_dist.generate import SamplingConfig, find_checkpoint, generate, load_model
from memgpt_dist.hf.export import REMOTE, hf_model
from memgpt_dist.model import GPT

TOL = 1e-5
VOCAB = 50
OPTIONS = [{}, {"position": "learned"}, {"memory_kwargs": {"kind": "delta"}}, {"memory": False},
           {"memory_kwargs": {"conv": 0}}, {"bias": False}, {"mlp": "gelu_tanh", "norm_eps": 1e-6},
           {"norm": "rmsnorm", "mlp": "swiglu", "mlp_multiple_of": 16, "n_kv_head": 2, "tie_embeddings": False,
            "bias": False, "rope_theta": 500000.0}, {"n_kv_head": 1, "mlp": "swiglu", "mlp_hidden": 40}]
LLAMA_STYLE = OPTIONS[-2]
# issue 15's attention modes and the forgetting gate (alpha from sigmoid(0) = 0.5: a decay left out shows)
ATTENTION = [{"attention": "window"}, {"attention": "window", "memory": False, "n_kv_head": 2},
             {"attention": "window", "position": "learned"}, {"attention": "full"},
             {"attention": "full", "memory": False}, {"memory_kwargs": {"decay": True, "decay_bias_init": 0.0}},
             {"attention": "window", "memory_kwargs": {"decay": True, "decay_bias_init": 0.0, "kind": "delta"}},
             # issue 16: the memory in some blocks only (memory.layers)
             {"memory_kwargs": {"layers": "1"}}, {"attention": "window", "memory_kwargs": {"layers": "0"}}]
OPTIONS += ATTENTION


def build_tiny(memory: bool = True, memory_kwargs: dict | None = None, **model_kwargs) -> GPT:
    """Segments of 8 tokens, init_std 0.1 so the memory read is far from zero (as tests/model's)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, segment_len=8, init_std=0.1, **model_kwargs)
    model = GPT(cfg, MemoryConfig(enabled=memory, **(memory_kwargs or {})))
    model.init_weights()
    with torch.no_grad():  # gates away from their init so that the memory read weighs in
        for name, p in model.named_parameters():
            if name.endswith("mem_beta"):
                p.uniform_(-1.0, 1.0)
    return model.eval()


def _remote(model):
    return hf_model(model.state_dict(), TrainConfig(model=model.cfg, memory=model.mem_cfg), 0, 1)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: json.dumps(o))
def test_remote_code_logits_equal_the_model(options):
    """Five segments and a partial one, read whole (the training forward) and from the cache."""
    model = build_tiny(**options)
    remote = _remote(model)
    ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        whole = remote(ids, use_cache=False).logits
        prefilled = remote(ids, use_cache=True).logits
    assert (whole - ref).abs().max() <= TOL
    assert (prefilled - ref).abs().max() <= TOL


@pytest.mark.parametrize("options", OPTIONS[:4] + [LLAMA_STYLE] + ATTENTION, ids=lambda o: json.dumps(o))
def test_cached_decoding_equals_the_full_forward(options):
    """A prompt, then one token at a time through the cache across three segment ends."""
    model = build_tiny(**options)
    remote = _remote(model)
    ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = remote(ids[:, :19], use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(19, ids.shape[1]):
            out = remote(ids[:, t:t + 1], cache=cache)
            logits.append(out.logits)
            cache = out.cache
        assert (torch.cat(logits, dim=1) - model(ids).logits).abs().max() <= TOL


def test_config_json_says_which_blocks_have_the_memory(tmp_path):
    """memory.layers reaches config.json as mem_layers, and a model built from that file alone has
    the memory's parameters in exactly those blocks (a strict load of the GPT's weights)."""
    from memgpt_dist.hf.export import hf_config
    from memgpt_dist.hf.remote.configuration_memgpt import MemGPTConfig
    from memgpt_dist.hf.remote.modeling_memgpt import MemGPTForCausalLM

    model = build_tiny(memory_kwargs={"layers": "1"})
    hf_config(TrainConfig(model=model.cfg, memory=model.mem_cfg), 0, 1).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mem_layers"] == [1]
    remote = MemGPTForCausalLM(MemGPTConfig.from_pretrained(tmp_path))
    remote.model.load_state_dict(model.state_dict(), strict=True)
    assert not hasattr(remote.model.blocks["0"].attn, "mem_q_proj")


# ------------------------------------------------------------------------------ exported runs
SEG = 16  # tiny_args' model.segment_len


@pytest.mark.parametrize("attention", ["segment", "window", "full"])
def test_cached_rows_of_a_left_padded_batch_equal_each_row_alone(attention):
    """Rows of different lengths (the second left-padded by 5) read together through the cache
    over two segment ends: each row's logits equal the model's forward of that row alone."""
    model = build_tiny(attention=attention)
    remote = _remote(model)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        out = remote(ids[:, :13], attention_mask=mask[:, :13], use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(13, ids.shape[1]):
            out = remote(ids[:, t:t + 1], cache=cache)
            logits.append(out.logits)
            cache = out.cache
        got = torch.cat(logits, dim=1)
        assert (got[0] - model(ids[:1]).logits[0]).abs().max() <= TOL
        assert (got[1, 5:] - model(ids[1:, 5:]).logits[0]).abs().max() <= TOL


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """A ZeRO-3 run (one process) and a pipeline run (two stages), three steps each, exported."""
    base = tmp_path_factory.mktemp("hf")
    common = ["--train.max_steps=3", "--checkpoint.every=3", "--train.eval_every=0"]
    train(tiny_args(tiny_data, base / "zero3", *common, "--parallel.zero_stage=3",
                    "--checkpoint.export_hf_at_end=true"), nproc=1)
    train(tiny_args(tiny_data, base / "pp2", *common, "--parallel.zero_stage=1", "--parallel.pp=2",
                    "--parallel.micro_batch_size=2", "--parallel.grad_accum=2"), nproc=2)
    for name in ("zero3", "pp2"):
        run_cmd([bin_path("memgpt-export"), "--checkpoint", str(base / name), "--out", str(base / f"{name}_hf"),
                 "--max-shard-size", "100KB"])
    return base


def _document(length: int) -> torch.Tensor:
    return torch.randint(2, 300, (1, length), generator=torch.Generator().manual_seed(3))


def _load(export_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare whole continuations
    return model.eval()


@pytest.mark.parametrize("layout", ["zero3", "pp2"])
def test_export_logits_equal_the_checkpoint_model(runs, layout):
    ours, cfg = load_model(find_checkpoint(runs / layout))
    assert cfg.parallel.pp == (2 if layout == "pp2" else 1)
    exported = _load(runs / f"{layout}_hf")
    ids = _document(4 * SEG + 5)
    with torch.no_grad():
        diff = (exported(ids, use_cache=False).logits - ours(ids).logits).abs().max()
    print(f"{layout}: max abs logit diff {diff:.3g}")
    assert diff <= TOL


def test_export_is_sharded_with_an_index_and_carries_its_code(runs):
    files = {p.name for p in (runs / "zero3_hf").iterdir()}
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    assert {"configuration_memgpt.py", "modeling_memgpt.py", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((runs / "zero3_hf" / "config.json").read_text())
    assert config["model_type"] == "memgpt" and "AutoModelForCausalLM" in config["auto_map"]


def test_greedy_generate_equals_memgpt_generate(runs):
    ours, _ = load_model(find_checkpoint(runs / "zero3"))
    prompt = _document(2 * SEG + 7)
    expected = generate(ours, prompt[0].tolist(), SamplingConfig(max_new_tokens=64, temperature=0.0), eos_id=None)
    out = _load(runs / "zero3_hf").generate(prompt, max_new_tokens=64, do_sample=False)
    assert out[0, prompt.shape[1]:].tolist() == expected


def test_left_padded_batch_generates_each_row_as_alone(runs):
    from transformers import AutoTokenizer

    model = _load(runs / "zero3_hf")
    tok = AutoTokenizer.from_pretrained(runs / "zero3_hf", trust_remote_code=True)
    texts = ["w1 w2 ( w3 ) : return w4 " * 6, "def w5 ( w6 ) :"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and (batch.attention_mask[1] == 0).any()
    out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    for row, text in enumerate(texts):
        alone = tok(text, return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=20, do_sample=False)
        assert out[row, -20:].tolist() == single[0, -20:].tolist(), row


def test_sampled_generate_runs_batched(runs):
    from transformers import AutoTokenizer

    model = _load(runs / "zero3_hf")
    tok = AutoTokenizer.from_pretrained(runs / "zero3_hf", trust_remote_code=True)
    batch = tok(["w1 w2 w3 " * 10, "class w7 :"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=40, do_sample=True, temperature=0.8, top_k=50, top_p=0.95)
    assert out.shape == (2, batch.input_ids.shape[1] + 40)
    assert tok.decode(out[0, -40:])


ISOLATED = textwrap.dedent("""
    import sys
    try:
        import memgpt_dist
        sys.exit("memgpt_dist is importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    model.generation_config.eos_token_id = None
    tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    ids = tok("def w1 ( w2 ) : return w3 " * 4, return_tensors="pt")
    print("IDS", model.generate(**ids, max_new_tokens=16, do_sample=False)[0].tolist())
""")


def test_export_loads_where_the_project_is_not_importable(runs, tmp_path):
    """python -I (no user site, no PYTHONPATH) from a directory outside the checkout; the project is
    installed editable here, so the child also drops setuptools' editable finder and the checkout
    from sys.meta_path / sys.path before it checks that `import memgpt_dist` fails."""
    script = tmp_path / "load.py"
    root = str(ROOT)
    script.write_text(f"import sys\nsys.path[:] = [p for p in sys.path if p.rstrip('/') != {root!r}]\n"
                      "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in f.__module__]\n"
                      + ISOLATED)
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-I", str(script), str(runs / "zero3_hf")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln[ln.index("IDS ["):] for ln in proc.stdout.splitlines() if "IDS [" in ln]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(runs / "zero3_hf", trust_remote_code=True)
    ids = tok("def w1 ( w2 ) : return w3 " * 4, return_tensors="pt")
    here = _load(runs / "zero3_hf").generate(**ids, max_new_tokens=16, do_sample=False)[0].tolist()
    assert json.loads(line[4:]) == here


def test_export_hf_at_end_writes_the_same_export_beside_the_checkpoints(runs):
    from safetensors.torch import load_file

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    at_end, cli = weights(runs / "zero3" / "hf"), weights(runs / "zero3_hf")
    assert at_end.keys() == cli.keys() and all(torch.equal(at_end[k], cli[k]) for k in cli)


def test_export_refuses_a_directory_that_is_not_an_export(runs, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    proc = run_cmd([bin_path("memgpt-export"), "--checkpoint", str(runs / "zero3"), "--out", str(tmp_path)],
                   check=False)
    assert proc.returncode == 2 and str(tmp_path) in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_export_replaces_an_earlier_export(runs, tmp_path):
    out = tmp_path / "again"
    for _ in range(2):
        run_cmd([bin_path("memgpt-export"), "--checkpoint", str(runs / "zero3"), "--out", str(out)])
    assert (out / "model.safetensors").is_file()


TASK = """task: memgpt_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


def test_lm_eval_scores_a_local_task(runs, tmp_path):
    docs = [{"context": f"def w{i} ( w{i + 1} ) :", "choices": [" return", " class"][::1 - 2 * (i % 2)],
             "label": i % 2} for i in range(8)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "memgpt_local.yaml").write_text(TASK.format(data=data))
    env = {**cli_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    proc = subprocess.run([bin_path("lm_eval"), "--model", "hf", "--model_args",
                           f"pretrained={runs / 'zero3_hf'},trust_remote_code=True,dtype=float32", "--tasks",
                           "memgpt_local", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
                           "--batch_size", "4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("|memgpt_local")]
    print(row)
    assert "acc" in row and 0.0 <= float(row.split("|")[7]) <= 1.0


def test_an_untied_gqa_export_round_trips_through_save_pretrained(tmp_path):
    """save_pretrained / from_pretrained keep the untied head and the grouped key/value heads."""
    from transformers import AutoModelForCausalLM

    model = build_tiny(**LLAMA_STYLE)
    remote = _remote(model)
    remote.save_pretrained(tmp_path)
    for name in ("configuration_memgpt.py", "modeling_memgpt.py"):
        shutil.copyfile(REMOTE / name, tmp_path / name)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert loaded.config.n_kv_head == 2 and not loaded.config.tie_word_embeddings
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (loaded(ids, use_cache=False).logits - model(ids).logits).abs().max() <= TOL
