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


class MissingWeightsError(CraftError, FileNotFoundError):
    """A weight file or model folder named by the config is not on this machine. The message
    names what was asked for, every place searched, and how to provide it (download command or
    config key). One class for the diffusion model and the rewards alike."""


class StageStopped(CraftError):
    """A stage stopped because it was asked to (a cancel, a stop file); what it committed is
    consistent and running the stage again continues from there."""


__all__ = ["CraftError", "MissingWeightsError", "StageStopped", "__version__"]
