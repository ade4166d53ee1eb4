"""Config loading: precedence, strictness and messages that name the key."""
from pathlib import Path

import pytest

from memgpt_dist.config import ConfigError, TrainConfig, config_from_json, load_config


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
