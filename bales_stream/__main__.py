"""``python -m bales_stream``: the same as the ``bales-stream`` command."""

import sys

from .cli import main

sys.exit(main())
