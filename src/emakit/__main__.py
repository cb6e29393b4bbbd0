"""``python -m emakit``: the same command line as ``emakit``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
