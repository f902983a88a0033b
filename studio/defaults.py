"""The studio's defaults, read by both its command line (studio.cli) and the app (studio.app),
which therefore need not import each other."""

DEFAULT_RUN_DIR = "runs/studio"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD = "20mb"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

__all__ = ["DEFAULT_MAX_UPLOAD", "DEFAULT_PORT", "DEFAULT_RUN_DIR", "LOCAL_HOSTS"]
