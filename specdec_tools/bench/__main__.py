"""``python -m specdec_tools.bench``: the same as ``specdec-bench``."""

import sys

from . import main

sys.exit(main())
