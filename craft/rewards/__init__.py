"""Reward models by name: ``load_reward("hpsv21")(images, prompts) -> np.ndarray``.

Registered names:

- ``toy_fidelity``, ``toy_selection``, ``toy_aesthetic``, ``toy_heldout``, ``toy_precision``: the toy world's pixel
  rewards (no weights), registered by its plugin (craft/toyworld/plugin.py; see craft/plugins.py).
- ``hpsv2``, ``hpsv21``: HPSv2 / HPSv2.1, raw cosine, x100 in reports (:mod:`.hps`).
- ``pickscore``: PickScore v1, ``logit_scale.exp() * cosine`` (:mod:`.pickscore`).
- ``aes``: LAION improved aesthetic predictor on CLIP ViT-L/14, about 1-10 (:mod:`.aesthetic`).
- ``imagereward``: ImageReward v1.0 on transformers' BLIP classes (its checkpoint ported key
  for key, no ``image-reward`` package), normalised as ``(r - 0.16717) / 1.03334``
  (:mod:`.imagereward`).

Not provided: **MPS**. Its published checkpoint is a whole pickled model object; loading it means
unpickling (running) code from the MPS repository, and this project only reads plain tensor
state dicts (``torch.load(weights_only=True)``). Asking for ``mps`` says so.

Weights are found offline only: the ``path`` given to :func:`load_reward` (the config's
``rewards.paths.<name>``), else the Hugging Face cache. :func:`check_available` resolves them
without loading, so a run fails in its first second, with an error that names the file, where
it looked and the command that provides it. Importing this package imports no torch.
"""

from .base import (FunctionReward, MissingDependencyError, MissingWeightsError, Reward,
                   RewardError, RewardSpec, TorchReward, UnknownRewardError, available_rewards,
                   check_available, load_reward, register_reward, reward_spec)
# Importing a reward module registers its factories (and imports nothing heavy).
from . import aesthetic, hps, imagereward, pickscore  # noqa: E402,F401

__all__ = [
    "Reward", "FunctionReward", "TorchReward", "RewardSpec", "RewardError", "UnknownRewardError",
    "MissingWeightsError", "MissingDependencyError", "register_reward", "load_reward",
    "check_available", "available_rewards", "reward_spec",
]
