"""`python -m pipeline.cache list|info|verify|rm` (see `pipeline.cache.cli`)."""

from pipeline.cache.cli import main

raise SystemExit(main())
