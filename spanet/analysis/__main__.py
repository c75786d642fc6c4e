"""``python -m spanet.analysis``: the spanet-analyze command line."""
import sys

from .cli import main

sys.exit(main())
