"""The words of Composite Reward Filtering that the config, the filter and the store share.

Why a module of its own: the config validates these names, the filter computes with them and the
store constrains its rows by them; defined in one of those, the other two would import a heavy
module (pandas, sqlite) or keep a copy that drifts. Nothing here imports anything.
"""

from __future__ import annotations

# Reward roles the paper's levels compare: h = HPS-like, p = PickScore-like, a = aesthetic.
ROLES: tuple[str, ...] = ("h", "p", "a")
# Each CRF level and the roles a candidate must beat its group reference on (I_h, I_ha, I_hpa);
# "none" compares nothing (every scorable candidate passes); "custom" uses filter.require.
LEVEL_ROLES: dict[str, tuple[str, ...]] = {"none": (), "h": ("h",), "ha": ("h", "a"),
                                           "hpa": ("h", "p", "a")}
LEVELS: tuple[str, ...] = ("h", "ha", "hpa", "custom", "none")
NORMALIZATIONS: tuple[str, ...] = ("zscore", "rank", "minmax")
# A manual curation decision on one candidate; absent = automatic.
OVERRIDE_ACTIONS: tuple[str, ...] = ("include", "exclude")

__all__ = ["LEVELS", "LEVEL_ROLES", "NORMALIZATIONS", "OVERRIDE_ACTIONS", "ROLES"]
