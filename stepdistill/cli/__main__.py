"""``python -m stepdistill.cli``."""

import sys

from stepdistill.cli.entry import main

sys.exit(main())
