"""`python -m vermeil ...`: the same as the `vermeil` console script."""

import sys

from vermeil.cli import main

if __name__ == "__main__":
    sys.exit(main())
