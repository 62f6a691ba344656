"""``python -m dualroute ...`` runs the console script."""

import sys

from dualroute.cli import main

if __name__ == "__main__":
    sys.exit(main())
