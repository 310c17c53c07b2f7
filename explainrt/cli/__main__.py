"""``python -m explainrt.cli``: the command line."""

import sys

from explainrt.cli import main

sys.exit(main())
