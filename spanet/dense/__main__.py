"""``python -m spanet.dense``: the spanet-dense command line (:mod:`spanet.dense.cli`)."""
import sys

from .cli import main

sys.exit(main())
