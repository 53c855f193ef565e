"""``python -m convert convert SRC DST`` / ``python -m convert fetch-demo``."""

import sys

from convert.cli import main

sys.exit(main())
