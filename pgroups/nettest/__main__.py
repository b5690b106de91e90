"""``python -m pgroups.nettest`` — the same as ``pgroups nettest``."""
import sys

from .cli import main

sys.exit(main())
