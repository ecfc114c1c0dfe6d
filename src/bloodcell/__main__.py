"""``python -m bloodcell ...`` is the ``bloodcell`` command."""

import sys

from bloodcell.cli import main

if __name__ == "__main__":
    sys.exit(main())
