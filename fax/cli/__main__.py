"""``python -m fax.cli``: the ``fax`` command."""

import sys

from fax.cli import main

sys.exit(main())
