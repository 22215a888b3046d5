"""``python -m star_core upscale INPUT -o OUTPUT [options]``: the headless command (see `star_core.cli`)."""
import sys

from .cli import main

sys.exit(main())
