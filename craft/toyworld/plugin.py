"""What the toy world adds to the library's registries, through the ``craft.plugins`` entry
point (see craft/plugins.py): its pixel rewards, its prompt sets and its template rewriter.

- Rewards ``toy_fidelity``, ``toy_selection``, ``toy_aesthetic`` play the roles of HPSv2.1,
  PickScore and AES; ``toy_heldout`` is the evaluation-only reward (the ImageReward/MPS
  analogue); :mod:`craft.toyworld.rewards` says what each measures. They have no weights, run
  on the CPU with numpy/scipy, and return NaN for a prompt outside the toy grammar. ``device``
  and ``dtype`` are accepted (one call signature for every reward) and ignored.
- Prompt sources ``toy`` / ``toy-heldout``: the fixed training / evaluation split of the toy
  grammar.
- Template rewrites of toy prompts: the rich words of the toy vocabulary, which the toy base
  model was trained to bind (the offline stand-in for the paper's LLM rewrites).

Nothing heavy is imported here; the factories import the toy modules when called.
"""

from __future__ import annotations

# Kept literal so that registering costs no scipy import; tests check it matches TOY_REWARDS.
TOY_REWARD_NAMES = ("toy_fidelity", "toy_selection", "toy_aesthetic", "toy_heldout",
                    "toy_precision")

_ROLES = {
    "toy_fidelity": "prompt fidelity: right colour and shape (the HPS-like role)",
    "toy_selection": "prompt agreement plus looks (the PickScore-like role)",
    "toy_aesthetic": "large, centred, sharp object on a clean background (the AES-like role)",
    "toy_heldout": "background colour and a single clean object (held out: evaluation only)",
    "toy_precision": "exact outline and strict colour of the object (held out: evaluation only)",
}


def _make_factory(name: str):
    def factory(*, device: str = "cpu", dtype=None, batch_size: int = 32, path=None, **kw):
        from craft.rewards.base import FunctionReward, RewardError

        if path is not None:
            raise RewardError(f"{name}: toy rewards have no weights, but a path was given "
                              f"({path!r}); remove rewards.paths.{name}")
        if kw:
            raise RewardError(f"{name}: unexpected options {sorted(kw)}; toy rewards take none")
        from craft.toyworld.rewards import TOY_REWARDS

        return FunctionReward(name, TOY_REWARDS[name], batch_size=batch_size)

    factory.__name__ = f"load_{name}"
    factory.__doc__ = f"Toy reward: {_ROLES[name]}."
    return factory


def is_toy_prompt(prompt: str) -> bool:
    """Whether the toy grammar reads ``prompt`` (an object colour other than the background)."""
    from craft.toyworld.grammar import PALETTE, parse_caption

    try:
        parsed = parse_caption(prompt)
    except ValueError:
        return False
    return parsed["colour"] != parsed["background"] and parsed["colour"] in PALETTE


def _toy_variants(prompt: str, num_variants: int, seed: int = 0) -> list[str]:
    from craft.toyworld.grammar import template_variants

    return template_variants(prompt, num_variants, seed)


def _split(which: int):
    def load() -> list[str]:
        from craft.toyworld.grammar import toy_prompt_split

        return list(toy_prompt_split()[which])

    return load


def register() -> None:
    from craft.stages.expansion import register_template_rewriter
    from craft.stages.prompts import register_prompt_source
    from craft.rewards.base import register_reward

    for name in TOY_REWARD_NAMES:
        register_reward(name, description=f"toy world: {_ROLES[name]}")(_make_factory(name))
    register_prompt_source("toy", _split(0), "toy", "the toy world's training prompts")
    register_prompt_source("toy-heldout", _split(1), "toy",
                           "the toy world's held-out evaluation prompts")
    register_template_rewriter("toy", is_toy_prompt, _toy_variants)


__all__ = ["TOY_REWARD_NAMES", "is_toy_prompt", "register"]
