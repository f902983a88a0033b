"""SFT: the kept set of CRAFT, each image with weight 1 (the paper's ablation of the advantage
weights; craft/methods/craft.py otherwise)."""

from __future__ import annotations

from craft.methods.craft import KeptSetMethod


class PlainSFT(KeptSetMethod):
    name = "sft"
    title = "SFT (the kept set, weight 1)"
    prefix = "SFT: "

    def weighting(self, cfg) -> str:
        return "uniform"

    def weight_words(self, cfg) -> str:
        return "weight 1 each (SFT)"


SFT = PlainSFT()

__all__ = ["SFT", "PlainSFT"]
