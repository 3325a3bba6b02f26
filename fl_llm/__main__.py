"""`python -m fl_llm ...` is `fl-llm ...` (what `ray job submit -- python -m fl_llm run` uses)."""

import sys

from fl_llm.cli import main

sys.exit(main())
