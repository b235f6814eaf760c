"""``python -m safedl_ext`` is the ``safedl`` command."""

import sys

from .cli import main

sys.exit(main())
