"""``python -m meowmx``: the ``meowmx`` command line, for when the script is not on PATH."""

import sys

from meowmx.cli import main

sys.exit(main())
