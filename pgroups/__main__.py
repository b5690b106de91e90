"""``python -m pgroups`` — the same as the ``pgroups`` console script."""
import sys

from .cli import main

sys.exit(main())
