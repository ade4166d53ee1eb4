"""Config loading: precedence, strictness and messages that name the key; the config documents itself."""
import dataclasses
import typing
from pathlib import Path

import pytest

from memgpt_dist import config as config_module
from memgpt_dist.config import ConfigError, TrainConfig, config_from_json, describe_config, field_doc, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    p = write(tmp_path, "model:\n  n_layer: 3\n  n_head: 2\n")
    cfg = load_config(p, ["--model.n_layer=5"])
    assert cfg.model.n_layer == 5  # CLI beats YAML
    assert cfg.model.n_head == 2  # YAML beats default
    assert cfg.model.n_embd == TrainConfig().model.n_embd  # default kept


def test_unknown_key_names_the_key(tmp_path):
    p = write(tmp_path, "model:\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"model\.n_layers"):
        load_config(p)


def test_unknown_section_is_an_error():
    with pytest.raises(ConfigError, match="modle"):
        load_config(None, ["modle.n_layer=2"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.n_layer must be an integer"):
        load_config(None, ["model.n_layer=two"])


def test_bad_combination_rejected_with_what_to_change():
    with pytest.raises(ConfigError, match=r"n_embd=100 is not divisible by model.n_head=3"):
        load_config(None, ["model.n_embd=100", "model.n_head=3"])


def test_float_written_without_dot_is_accepted():
    assert load_config(None, ["optim.lr=1e-3", "optim.min_lr=1e-5"]).optim.min_lr == 1e-5


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_override_must_be_dotted_assignment():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["--model.n_layer"])


def test_json_round_trip_is_identity():
    cfg = load_config(None, ["model.n_layer=3", "memory.enabled=false"])
    assert config_from_json(cfg.to_json()) == cfg


def test_frozen():
    cfg = TrainConfig()
    with pytest.raises(Exception):
        cfg.model.n_layer = 7  # type: ignore[misc]


@pytest.mark.parametrize("name", ["tiny", "gpt-125m", "gpt-350m", "gpt-1.3b", "gpt-7b"])
def test_shipped_configs_load(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert cfg.parallel.zero_stage == 3


def test_carrying_memory_without_memory_is_an_error():
    with pytest.raises(ConfigError, match="carry_memory.*memory.enabled"):
        load_config(None, ["train.carry_memory=true", "memory.enabled=false"])


def test_dpfp_order_beyond_the_head_is_an_error():
    # head_dim 4: r has 8 entries, so offsets 1..8 fit and 9 would wrap past r
    base = ["model.n_embd=16", "model.n_head=4"]
    assert load_config(None, base + ["memory.nu=8"]).memory.nu == 8
    with pytest.raises(ConfigError, match=r"memory.nu=9 exceeds 2 \* head_dim = 8 .*lower memory.nu"):
        load_config(None, base + ["memory.nu=9"])
    # a model without memory never computes the features: its memory.nu is not checked
    assert load_config(None, base + ["memory.nu=9", "memory.enabled=false"]).memory.nu == 9


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.vocab_size > 0 and cfg.train.max_steps >= 1


def test_data_mix_is_parsed_and_checked():
    cfg = load_config(None, ["data.path=data/a", "data.mix=data/b:0.25,data/c:0.05"])
    (main, w0), *rest = cfg.data.mix_sources()
    assert main == "data/a" and w0 == pytest.approx(0.7) and rest == [("data/b", 0.25), ("data/c", 0.05)]
    with pytest.raises(ConfigError, match="data.mix item 'data/b'.*PATH:WEIGHT"):
        load_config(None, ["data.mix=data/b"])
    with pytest.raises(ConfigError, match="data.mix weights sum to 1.1"):
        load_config(None, ["data.mix=data/b:0.6,data/c:0.5"])


def test_n_segments_schedule():
    cfg = load_config(None, ["data.n_segments=4", "data.n_segments_schedule=0:2,10:3"])
    assert [cfg.data.n_segments_at(s) for s in (0, 9, 10, 99)] == [2, 2, 3, 3]
    assert load_config(None, ["data.n_segments=4"]).data.n_segments_at(50) == 4
    with pytest.raises(ConfigError, match="n_segments_schedule item 'x'"):
        load_config(None, ["data.n_segments_schedule=x"])
    with pytest.raises(ConfigError, match="increasing"):
        load_config(None, ["data.n_segments_schedule=5:2,1:3"])


def test_tensor_and_pipeline_layouts_load():
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1", "parallel.global_batch_size=32"])
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.global_batch_size) == (2, 2, 32)
    assert cfg.parallel.pp_partition == "parameters"


def test_parallel_keys_are_checked():
    with pytest.raises(ConfigError, match="parallel.pp_partition='layers'.*'parameters' or 'uniform'"):
        load_config(None, ["parallel.pp_partition=layers"])
    with pytest.raises(ConfigError, match="parallel.global_batch_size must be >= 0"):
        load_config(None, ["parallel.global_batch_size=-8"])
    with pytest.raises(ConfigError, match="degrees must be >= 1"):
        load_config(None, ["parallel.tp=0"])


def _all_fields(cls=TrainConfig, prefix=""):
    """(dotted key, field) of the root and of every section, recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _all_fields(hints[f.name], prefix + f.name + ".")


def test_every_field_has_a_one_line_doc():
    undocumented = [key for key, f in _all_fields() if not field_doc(f).strip() or "\n" in field_doc(f)]
    assert not undocumented, f"add a one-line doc (doc_field) to: {', '.join(undocumented)}"


def test_describe_config_lists_every_key_with_type_default_and_doc():
    text = describe_config()
    for key, f in _all_fields():
        assert key in text, key
        assert field_doc(f) in text, key
    assert '  model.position: "rope" | "learned" = "rope"\n' in text
    assert "  parallel.zero_stage: 0 | 1 | 2 | 3 = 3\n" in text
    assert "train:  (TrainingConfig)" in text


def test_describe_config_shows_the_values_that_differ_from_the_default():
    text = describe_config(load_config(None, ["model.position=learned", "train.max_steps=70"]))
    assert '  model.position: "rope" | "learned" = "rope"  (this run: "learned")\n' in text
    assert "  train.max_steps: int = 100  (this run: 70)\n" in text
    assert "  model.n_layer: int = 2\n" in text  # unchanged: no value shown


@pytest.mark.parametrize("override, message", [
    ("model.position=alibi", "model.position='alibi': use 'rope' or 'learned'"),
    ("memory.kind=slot", "memory.kind='slot': use 'head' or 'delta'"),
    ("parallel.precision=fp8", "parallel.precision='fp8': use one of 'auto', 'fp32', 'bf16' or 'fp16'"),
    ("parallel.zero_stage=4", "parallel.zero_stage=4: use one of 0, 1, 2 or 3"),
    ("parallel.zero_stage=true", "parallel.zero_stage=True: use one of 0, 1, 2 or 3"),  # YAML's true is not 1
    ("parallel.zero_stage='1'", "parallel.zero_stage='1': use one of 0, 1, 2 or 3"),
])
def test_literal_fields_accept_only_their_values(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_literal_fields_load_their_values():
    cfg = load_config(None, ["model.position=learned", "memory.kind=delta", "parallel.zero_stage=0",
                             "parallel.precision=bf16", "parallel.pp_partition=uniform"])
    assert (cfg.model.position, cfg.memory.kind, cfg.parallel.zero_stage) == ("learned", "delta", 0)
    assert type(cfg.parallel.zero_stage) is int


def test_mix_and_schedule_are_parsed_once_at_load(monkeypatch):
    calls = {"mix": 0, "schedule": 0}
    for name, fn in (("mix", config_module._parse_mix), ("schedule", config_module._parse_schedule)):
        def counted(text, fn=fn, name=name):
            calls[name] += 1
            return fn(text)
        monkeypatch.setattr(config_module, f"_parse_{name}", counted)
    cfg = load_config(None, ["data.mix=data/b:0.25", "data.n_segments_schedule=0:2,10:3"])
    after_load = dict(calls)
    assert [cfg.data.n_segments_at(s) for s in range(1000)][::500] == [2, 3]
    assert cfg.data.mix_sources() == [("data/default", 0.75), ("data/b", 0.25)]
    assert cfg.data.mix_sources() is not cfg.data.mix_sources()  # callers get a fresh list
    assert calls == after_load and after_load["schedule"] >= 1


def test_parsed_values_stay_out_of_equality_and_json():
    a = load_config(None, ["data.n_segments_schedule=0:2"])
    b = dataclasses.replace(a, data=dataclasses.replace(a.data, n_segments_schedule="0:2"))
    assert a == b and hash(a) == hash(b)
    assert set(a.to_dict()["data"]) == {f.name for f in dataclasses.fields(config_module.DataConfig)}
    assert dataclasses.replace(a.data, n_segments_schedule="0:5").n_segments_at(0) == 5  # replace re-parses


def test_parsed_values_survive_pickle_and_copy():
    import copy
    import pickle

    cfg = load_config(None, ["data.mix=data/b:0.25", "data.n_segments_schedule=0:2,10:3"])
    for clone in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):  # loader workers get pickled copies
        assert clone == cfg and clone.data.n_segments_at(10) == 3 and clone.data.mix_sources() == cfg.data.mix_sources()


# to_json() of these configs as written by main at c8771de, before the config documented itself,
# plus the `perf:` section (issue 16, regenerated then): checkpoints store the JSON and its sha256,
# so it must not change by a byte unless a section is added; checkpoints of older configs still
# resume, since a resume compares model, memory and data.n_segments only (test_old_checkpoint.py).
JSON_CASES = {
    "default": (None, []),
    "tiny": ("tiny.yaml", []),
    "recall": ("recall.yaml", []),
    "gpt-7b": ("gpt-7b.yaml", []),
    "tiny-overrides": ("tiny.yaml", ["data.mix=data/b:0.25,data/c:0.05", "data.n_segments_schedule=0:2,10:3",
                                     "model.position=learned", "memory.kind=delta", "parallel.zero_stage=1",
                                     "parallel.pp_partition=uniform", "parallel.precision=bf16", "optim.lr=1e-3"]),
}


@pytest.mark.parametrize("name", sorted(JSON_CASES))
def test_to_json_is_byte_identical_to_before(name):
    """The format checkpoints store and hash: pinned (regenerated only when a field is added)."""
    path, overrides = JSON_CASES[name]
    cfg = load_config(CONFIGS / path if path else None, overrides)
    expected = (Path(__file__).parent / "data" / "config_json" / f"{name}.json").read_text()
    assert cfg.to_json() == expected
