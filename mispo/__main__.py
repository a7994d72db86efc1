"""`python -m mispo ARGS` is `mispo ARGS`."""

import sys

from mispo.cli import main

if __name__ == "__main__":
    sys.exit(main())
