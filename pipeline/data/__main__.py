"""`python -m pipeline.data import|check` (see `pipeline.data.cli`)."""

import sys

from pipeline.data.cli import main

sys.exit(main())
