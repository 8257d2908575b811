"""``python -m thpguard``: the same command line as ``thpguard``."""

import sys

from .cli import main

sys.exit(main())
