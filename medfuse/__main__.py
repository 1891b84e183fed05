"""``python -m medfuse``: the ``medfuse`` command, where the scripts folder is not on the PATH (Windows, say)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
