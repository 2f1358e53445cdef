"""``python -m streamstore``: the same as the ``streamstore`` command."""

import sys

from streamstore.cli import main

sys.exit(main())
