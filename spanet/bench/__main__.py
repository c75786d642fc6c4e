"""``python -m spanet.bench``: the spanet-bench command line."""
import sys

from .cli import main

sys.exit(main())
