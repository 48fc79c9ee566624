"""``python -m dstore``."""

import sys

from dstore.cli import main

sys.exit(main())
