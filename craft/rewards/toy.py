"""The toy world's pixel rewards, registered under their names (toy_fidelity, ...).

They play the roles of HPSv2.1 (fidelity), PickScore (selection), AES (aesthetic) and a held-out
evaluation reward (ImageReward/MPS analogue); see :mod:`craft.toyworld.rewards` for what each
measures. They have no weights, run on the CPU with numpy/scipy, and return NaN for a prompt
outside the toy grammar. ``device`` and ``dtype`` are accepted (one call signature for every
reward) and ignored.
"""

from __future__ import annotations

from .base import FunctionReward, RewardError, register_reward

# Kept literal so that registering costs no scipy import; tests check it matches TOY_REWARDS.
TOY_REWARD_NAMES = ("toy_fidelity", "toy_selection", "toy_aesthetic", "toy_heldout")

_ROLES = {
    "toy_fidelity": "prompt fidelity: right colour and shape (the HPS-like role)",
    "toy_selection": "prompt agreement plus looks (the PickScore-like role)",
    "toy_aesthetic": "large, centred, sharp object on a clean background (the AES-like role)",
    "toy_heldout": "background colour and a single clean object (held out: evaluation only)",
}


def _make_factory(name: str):
    def factory(*, device: str = "cpu", dtype=None, batch_size: int = 32, path=None, **kw):
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


for _name in TOY_REWARD_NAMES:
    register_reward(_name, description=f"toy world: {_ROLES[_name]}")(_make_factory(_name))
