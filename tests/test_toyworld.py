"""The toy world's grammar, renderer, rewards and tokenizer, checked on images with known answers."""

import dataclasses
import random

from pathlib import Path

import numpy as np
import pytest
import torch

from craft.toyworld import grammar
from craft.toyworld.grammar import Scene, caption, parse_caption, plain_caption
from craft.toyworld.render import render, render_array, shape_geometry
from craft.toyworld.rewards import TOY_REWARDS, analyse, components

ROOT = Path(__file__).resolve().parents[1]

PROMPT = "a red circle on a blue background"
IDEAL = Scene("red", "circle", "blue", size="large", position="in the center",
              sharpness="sharp", texture="plain", seed=3)


def score(name, scene, prompt=PROMPT):
    return float(TOY_REWARDS[name]([render_array(scene)], [prompt])[0])


def test_plain_caption_form_is_exact():
    assert plain_caption("red", "circle", "blue") == PROMPT
    assert caption(IDEAL) == PROMPT
    assert caption(IDEAL, grammar.ATTRIBUTES) == (
        "a large sharp red circle in the center of a plain blue background")


def test_vocabulary_covers_the_issue_minimum():
    assert {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"} <= set(
        grammar.COLOURS)
    assert {"circle", "square", "triangle"} <= set(grammar.SHAPES)


@pytest.mark.parametrize("mention", [(), ("size",), ("position", "texture"), grammar.ATTRIBUTES])
def test_caption_parses_back(mention):
    rng = random.Random(1)
    for _ in range(20):
        s = grammar.sample_scene(rng)
        parsed = parse_caption(caption(s, mention))
        assert (parsed["colour"], parsed["shape"], parsed["background"]) == (
            s.colour, s.shape, s.background)
        for attr in mention:
            assert parsed[attr] == getattr(s, attr)


def test_parse_rejects_foreign_prompt_with_a_teaching_message():
    with pytest.raises(ValueError, match="not a toy-world caption.*Expected the form"):
        parse_caption("a photo of an astronaut riding a horse")


def test_scene_rejects_invisible_object():
    with pytest.raises(ValueError, match="invisible"):
        Scene("red", "circle", "red")


def test_template_variants_are_rich_valid_and_deterministic():
    v1 = grammar.template_variants(PROMPT, 6, seed=0)
    assert v1 == grammar.template_variants(PROMPT, 6, seed=0)
    assert len(v1) == 6 and len(set(v1)) == 6
    assert v1[0] == "a large sharp red circle in the center of a plain blue background"
    for v in v1:
        p = parse_caption(v)
        assert (p["colour"], p["shape"], p["background"]) == ("red", "circle", "blue")
        assert sum(k in p for k in grammar.ATTRIBUTES) >= 2


def test_prompt_split_is_disjoint_and_complete():
    train, held = grammar.toy_prompt_split()
    assert not set(train) & set(held)
    assert len(train) + len(held) == 168


def test_render_is_deterministic_and_sized():
    a, b = render_array(IDEAL), render_array(IDEAL)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert render(IDEAL).size == (32, 32)


def test_analysis_recovers_geometry():
    cx, cy, r = shape_geometry(IDEAL)
    a = analyse(render_array(IDEAL))
    assert a.present == 1.0
    assert abs(a.radius - r) < 1.0
    assert a.centre_offset < 1.5
    assert a.edge_contrast > 0.5


# Each row: a render that is worse than the ideal one in a known way, and the rewards that must
# rank the ideal render above it (all the others may do anything).
WORSE = [
    ("wrong colour", dict(colour="green"), ["toy_fidelity", "toy_selection"]),
    ("wrong shape", dict(shape="triangle"), ["toy_fidelity"]),
    ("wrong shape (square)", dict(shape="square"), ["toy_fidelity"]),
    ("tiny", dict(size="small"), ["toy_aesthetic", "toy_selection"]),
    ("off-centre", dict(position="in the top left", size="medium"), ["toy_aesthetic"]),
    ("blurred", dict(sharpness="blurry"), ["toy_aesthetic", "toy_selection"]),
    ("noisy background", dict(texture="noisy"), ["toy_aesthetic"]),
    ("wrong background", dict(background="yellow"), ["toy_heldout", "toy_selection"]),
]


@pytest.mark.parametrize("label,change,rewards", WORSE, ids=[w[0] for w in WORSE])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ideal_render_beats_a_worse_one(label, change, rewards, seed):
    ideal = dataclasses.replace(IDEAL, seed=seed)
    worse = dataclasses.replace(ideal, **change)
    for name in rewards:
        assert score(name, ideal) > score(name, worse) + 0.05, (label, name)


def test_ideal_render_is_near_the_top_of_every_reward():
    for name in TOY_REWARDS:  # precision: a 32 px circle's outline is ~0.7 IoU of the ideal
        assert score(name, IDEAL) > (0.8 if name == "toy_precision" else 0.85), name


def test_off_centre_medium_object_drops_only_centring():
    c_ideal = components(render_array(dataclasses.replace(IDEAL, size="medium")), PROMPT)
    c_off = components(render_array(dataclasses.replace(
        IDEAL, size="medium", position="on the right")), PROMPT)
    assert c_ideal["centring"] > 0.9 > 0.3 > c_off["centring"]
    assert abs(c_ideal["colour"] - c_off["colour"]) < 0.05


def test_blank_image_scores_low_and_foreign_prompt_is_nan():
    blank = np.full((32, 32, 3), 128, np.uint8)
    for name in ("toy_fidelity", "toy_aesthetic"):
        assert TOY_REWARDS[name]([blank], [PROMPT])[0] < 0.2
    out = TOY_REWARDS["toy_fidelity"]([render_array(IDEAL)], ["an astronaut on a horse"])
    assert np.isnan(out[0])


def test_rewards_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="one prompt per image"):
        TOY_REWARDS["toy_fidelity"]([render_array(IDEAL)] * 2, [PROMPT])


def test_tokenizer_has_one_token_per_word(tmp_path):
    from craft.toyworld import model

    tok = model.load_tokenizer(model.write_tokenizer(tmp_path / "tok"))
    text = "a large sharp red circle in the center of a plain blue background"
    ids = tok(text).input_ids
    assert len(ids) == len(text.split()) + 2  # BOS and EOS
    assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in text.split()]
    for word in model.toy_words():
        assert len(tok(word).input_ids) == 3, word
    assert len(tok("zebra").input_ids) > 3  # unknown words still tokenize, letter by letter


def test_t5_tokenizer_is_built_offline_one_piece_per_word(tmp_path):
    from craft.toyworld import model

    tok = model.load_t5_tokenizer(model.write_t5_tokenizer(tmp_path / "t5", max_length=16))
    text = "a large sharp red circle in the center of a plain blue background"
    ids = tok(text).input_ids
    assert len(ids) == len(text.split()) + 1 and ids[-1] == tok.eos_token_id == 1  # EOS, no BOS
    assert tok.pad_token_id == 0 and tok.model_max_length == 16
    assert tok("zebra").input_ids[:-1] and tok.unk_token_id not in tok("zebra").input_ids


def test_flow_base_training_is_seeded_and_resumes_exactly(tmp_path):
    """`craft toy train-base --family sd3` on a few scenes: stopped after 2 of 4 steps and
    rerun, it ends with bitwise the weights of an uninterrupted run, in a pipeline that
    DiffusionPipeline.from_pretrained loads as SD3."""
    import dataclasses

    from diffusers import DiffusionPipeline

    from craft.toyworld.train_base import BaseTrainConfig, train_base

    cfg = dataclasses.replace(BaseTrainConfig.for_family("sd3"), num_scenes=64, unet_steps=4,
                              unet_batch=4, checkpoint_every=2, warmup_steps=2, threads=1)
    straight = train_base(tmp_path / "a", tmp_path / "a.work", cfg)
    calls = []
    assert train_base(tmp_path / "b", tmp_path / "b.work", cfg,
                      should_stop=lambda: calls.append(1) or len(calls) >= 2) is None
    resumed = train_base(tmp_path / "b", tmp_path / "b.work", cfg)
    a, b = (DiffusionPipeline.from_pretrained(p) for p in (straight, resumed))
    assert type(a).__name__ == "StableDiffusion3Pipeline"
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert a.vae.config.shift_factor != 0 and a.vae.config.scaling_factor > 0


@pytest.mark.skipif(not (ROOT / "assets" / "toy-flow" / "model_index.json").exists(),
                    reason="assets/toy-flow is not built here (craft toy train-base --family sd3)")
def test_shipped_flow_base_loads_as_sd3_and_fits_the_size_budget():
    from diffusers import DiffusionPipeline

    folder = ROOT / "assets" / "toy-flow"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.tokenizer_3.model_max_length == 16
    im = pipe("a red circle on a blue background", num_inference_steps=4, max_sequence_length=16,
              generator=torch.Generator().manual_seed(0)).images[0]
    assert im.size == (32, 32)
