"""python -m foveal.frontier: see foveal.frontier.cli (or --help)."""

import sys

from .cli import main

sys.exit(main())
