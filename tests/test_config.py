"""Config: defaults, YAML layering, --set overrides, errors that teach, exact round-trips."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from craft.run.config import (
    DEFAULT_CONFIG_PATH, PROJECT_ROOT, SECTIONS, ConfigError, CraftConfig, FilterConfig,
    TrainConfig, config_from_dict, config_to_dict, config_to_yaml, field_choices, field_help,
    load_config, resolve_path, save_config,
)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_default_is_toy_yaml_and_valid():
    cfg = load_config()
    assert cfg == load_config(DEFAULT_CONFIG_PATH)
    assert cfg.model.pretrained == "assets/toy-base"
    assert cfg.prompts.num_variants == 4 and cfg.generation.seeds_per_prompt == 4
    assert cfg.filter.top_k == 100
    assert cfg.train.effective_batch % cfg.train.micro_batch == 0
    assert cfg.train.mixed_precision == "no"  # quoted in YAML; bare `no` would be False
    assert isinstance(cfg.rewards.names, tuple)
    CraftConfig()  # the dataclass defaults alone are a valid config too


def test_every_field_has_help_and_sections_match():
    assert list(SECTIONS) == [f.name for f in dataclasses.fields(CraftConfig)]
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{name}.{f.name} lacks help"
            assert field_help(name, f.name) == f.metadata["help"]
    assert field_choices("filter", "level") == ("h", "ha", "hpa", "custom", "none")
    assert field_choices("model", "revision") == None


def test_file_overrides_dataclass_defaults_not_toy_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  steps: 7\n"))
    assert cfg.train.steps == 7
    assert cfg.model.family == "auto"  # dataclass default; toy.yaml says "toy"


def test_empty_file_and_empty_section(tmp_path):
    assert load_config(write(tmp_path, "")) == CraftConfig()
    assert load_config(write(tmp_path, "train:\n")) == CraftConfig()


def test_unknown_key_names_key_file_and_allowed_keys(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "train.lrr" in msg and str(path) in msg
    assert "did you mean 'lr'" in msg
    assert "allowed: method, steps, lr, effective_batch" in msg
    assert e.value.keys == ("train.lrr",)


def test_unknown_section(tmp_path):
    path = write(tmp_path, "trainer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown section: 'trainer' .*did you mean 'train'"):
        load_config(path)


def test_unknown_key_from_set_names_set():
    with pytest.raises(ConfigError, match=r"'model\.dtypes' \(from --set model\.dtypes=x\)"):
        load_config(overrides=["model.dtypes=x"])


@pytest.mark.parametrize("text, key, expected, got", [
    ("train:\n  steps: many\n", "train.steps", "expected int", "str 'many'"),
    ("train:\n  steps: 1.5\n", "train.steps", "expected int", "float 1.5"),
    ("train:\n  lora: 1\n", "train.lora", "expected bool", "int 1"),
    ("train:\n  steps: true\n", "train.steps", "expected int", "bool True"),
    ("rewards:\n  names: toy_fidelity\n", "rewards.names", "expected a list of str",
     "str 'toy_fidelity'"),
    ("filter:\n  weights: [1, 2]\n", "filter.weights", "expected a mapping of str to float",
     "list [1, 2]"),
    ("model:\n  dtype: fp32\n", "model.dtype", "expected one of 'auto', 'float32'", "str 'fp32'"),
    ("eval:\n  num_prompts: all\n", "eval.num_prompts", "expected int or null", "str 'all'"),
    ("train:\n  mixed_precision: no\n", "train.mixed_precision", "quote it: 'no'", "bool False"),
])
def test_wrong_type_names_key_type_value_and_file(tmp_path, text, key, expected, got):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{key}: ") and expected in msg and got in msg and str(path) in msg


def test_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(write(tmp_path, "train: 3\n"))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="<form>: the top level must be a mapping"):
        config_from_dict(["train"], source="<form>")


def test_numbers_are_normalised():
    cfg = load_config(overrides=["train.lr=1e-4", "generation.guidance_scale=5"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # PyYAML reads 1e-4 as text
    assert cfg.generation.guidance_scale == 5.0 and isinstance(cfg.generation.guidance_scale, float)
    assert TrainConfig(preview_prompts=["a", "b"]).preview_prompts == ("a", "b")


@pytest.mark.parametrize("overrides, fragment, keys", [
    (["filter.weights={toy_fidelity: 1.0, clip: 1.0}"], "'clip' is not in rewards.names",
     ("filter.weights", "rewards.names")),
    (["rewards.roles.h=clip"], "role 'h' names 'clip', which is not in rewards.names",
     ("rewards.roles", "rewards.names")),
    (["rewards.roles={x: toy_fidelity}"], "role 'x' is not one of", ("rewards.roles",)),
    (["train.micro_batch=5"], "must be a multiple of train.micro_batch (5)",
     ("train.effective_batch", "train.micro_batch")),
    (["filter.level=custom"], "must name at least one reward when filter.level is 'custom'",
     ("filter.require", "filter.level")),
    (["filter.level=custom", "filter.require=[nope]"], "'nope' is not in rewards.names",
     ("filter.require", "rewards.names")),
    (["rewards.roles={h: toy_fidelity}"], "needs rewards.roles for ['p', 'a']",
     ("filter.level", "rewards.roles")),
    (["model.device=cpu", "model.dtype=float16"], "float16 is not supported for CPU",
     ("model.dtype", "model.device")),
    (["model.device=gpu"], "must be 'auto', 'cpu', 'cuda' or 'cuda:N'", ("model.device",)),
    (["model.device=cpu", "train.mixed_precision=fp16"], "fp16 autocast needs CUDA",
     ("train.mixed_precision", "model.device")),
    (["prompts.expander=llm_local"], "is required when prompts.expander is 'llm_local'",
     ("prompts.expander_model", "prompts.expander")),
    (["generation.height=100"], "must be a multiple of 8", ("generation.height",)),
    (["train.cond_dropout=1.0"], "must lie in [0, 1)", ("train.cond_dropout",)),
    (["train.lr=0"], "must be finite and > 0", ("train.lr",)),
    (["train.lr=.inf"], "must be finite and > 0", ("train.lr",)),
    (["train.lr_warmup_steps=500"], "must not exceed train.steps", ("train.lr_warmup_steps",
                                                                    "train.steps")),
    (["filter.weights.toy_fidelity=-1"], "must be finite and >= 0", ("filter.weights",)),
    (["rewards.names=[toy_fidelity, toy_fidelity]"], "more than once", ("rewards.names",)),
])
def test_cross_field_checks_name_field_rule_value_and_source(overrides, fragment, keys):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    msg = str(e.value)
    assert fragment in msg
    assert msg.startswith(f"{keys[0]} = ")  # the field and the value received
    assert "; " in msg  # ... followed by the fix
    assert "(from --set" in msg
    assert e.value.keys == keys


def test_error_blames_the_source_of_the_offending_value(tmp_path):
    with pytest.raises(ConfigError, match=r"\(from <form>\)$"):
        config_from_dict({"filter": {"level": "custom"}}, source="<form>")
    path = write(tmp_path, "train:\n  micro_batch: 6\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides=["train.effective_batch=20"])
    assert str(path) in str(e.value) and "--set train.effective_batch=20" in str(e.value)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="filter.top_k = 0: must be finite and > 0"):
        FilterConfig(top_k=0)
    with pytest.raises(ConfigError, match="filter.weights"):
        CraftConfig(filter=FilterConfig(weights={"clip": 1.0}))


def test_overrides():
    cfg = load_config(overrides=[
        "train.steps=10",
        "rewards.names=[toy_fidelity, toy_selection, toy_aesthetic, extra]",
        "filter.weights.extra=0.5",
        "model.variant=16",       # text field: stays the string "16"
        "model.revision=",        # empty = null
        "train.mixed_precision=no",
        "train.preview_prompts=['a: b', plain]",
    ])
    assert cfg.train.steps == 10
    assert cfg.rewards.names[-1] == "extra"
    assert cfg.filter.weights == {"toy_fidelity": 0.4, "toy_selection": 0.4,
                                  "toy_aesthetic": 0.2, "extra": 0.5}
    assert cfg.model.variant == "16" and cfg.model.revision is None
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.preview_prompts == ("a: b", "plain")
    # later overrides win
    assert load_config(overrides=["train.steps=3", "train.steps=4"]).train.steps == 4


@pytest.mark.parametrize("bad", ["train.steps", "steps=3", "train..x=1", "a.b.c.d=1",
                                 "train.steps.x=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        load_config(overrides=[bad])


def test_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=2e-5))
    assert changed.train.lr == 2e-5 and cfg.train.lr == 1e-4


def test_round_trip_exact(tmp_path):
    cfg = load_config(overrides=["train.lr=3.3e-5", "model.revision=abc", "filter.level=custom",
                                 "filter.require=[toy_aesthetic]", "eval.num_prompts=null",
                                 "generation.height=64", "train.mixed_precision=auto"])
    path = save_config(cfg, tmp_path / "sub" / "saved.yaml")
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert load_config(save_config(CraftConfig(), tmp_path / "d.yaml")) == CraftConfig()
    text = config_to_yaml(cfg)
    assert text.index("model:") < text.index("train:")  # declaration order, not alphabetical


@settings(max_examples=40, deadline=None)
@given(prompts=st.lists(st.text(min_size=1, max_size=30), max_size=4),
       lr=st.floats(min_value=1e-12, max_value=10.0, allow_nan=False),
       margin=st.floats(min_value=-5, max_value=5, allow_nan=False),
       revision=st.none() | st.text(max_size=12))
def test_round_trip_property(prompts, lr, margin, revision):
    cfg = CraftConfig(
        model=dataclasses.replace(CraftConfig().model, revision=revision),
        train=TrainConfig(lr=lr, preview_prompts=tuple(prompts)),
        filter=FilterConfig(margin=margin))
    assert config_from_dict(__import__("yaml").safe_load(config_to_yaml(cfg))) == cfg
    assert math.isclose(cfg.train.lr, lr)


def test_resolve_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("configs/toy.yaml") == PROJECT_ROOT / "configs" / "toy.yaml"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "toy.yaml").write_text("")
    assert resolve_path("configs/toy.yaml") == tmp_path / "configs" / "toy.yaml"  # cwd first
    assert resolve_path("runwayml/stable-diffusion-v1-5") is None  # a hub id
    assert resolve_path(str(tmp_path)) == tmp_path


@pytest.mark.parametrize("prompt", ["\x85", "a\u2028b", "caf\u00e9 \u00e0 la cr\u00e8me", "\u65e5\u672c"])
def test_round_trip_keeps_unicode_line_breaks_and_non_ascii(prompt):
    cfg = CraftConfig(train=TrainConfig(preview_prompts=(prompt,)))
    assert config_from_dict(__import__("yaml").safe_load(config_to_yaml(cfg))) == cfg


def test_choice_lists_are_defined_once_and_agree():
    """The config's choices are the tuples the modules act on (craft.run.choices), not copies."""
    from craft.stages import advantages
    from craft.stages import diversity
    from craft.stages import embeddings
    from craft.models import flow
    from craft.models import loading as models
    from craft.stages import prompts
    from craft.methods import training
    from craft.run import choices as vocab
    from craft.run.config import field_choices
    from craft.models.families import FAMILY_PIPELINES

    assert field_choices("advantage", "mode") == advantages.MODES
    assert field_choices("eval", "diversity_encoder") == diversity.ENCODERS
    assert field_choices("embed", "encoder") == embeddings.ENCODERS
    assert field_choices("train", "timestep_sampling") == flow.TIMESTEP_SAMPLING
    assert field_choices("prompts", "format") == prompts.FORMATS
    assert field_choices("model", "family") == models.FAMILIES
    assert set(models.FAMILIES) == {"auto", *FAMILY_PIPELINES, "toy"}
    assert set(training.FLOW_WEIGHTING_OF) == set(vocab.FLOW_WEIGHTINGS)
    assert set(field_choices("train", "timestep_weighting")) == (
        set(training.UNET_WEIGHTINGS) | set(training.FLOW_WEIGHTING_OF))
