"""``python -m craft.cli`` (and ``accelerate launch -m craft.cli``): the same as ``craft``."""

import sys

from craft.cli.main import main

sys.exit(main())
