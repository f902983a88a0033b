"""CRAFT Studio: align text-to-image diffusion models with human preference.

Importing ``craft`` must stay cheap (the CLI, the studio and subprocess workers all import it),
so nothing heavy (torch, diffusers, pandas) is imported here; import the stage modules directly.
"""

__version__ = "0.1.0"


class CraftError(Exception):
    """Base class for errors a user can fix (bad config, bad input, unusable store).

    Front ends catch this one class to show a short message instead of a traceback; anything
    else escaping the library is a bug and keeps its traceback.
    """


__all__ = ["CraftError", "__version__"]
