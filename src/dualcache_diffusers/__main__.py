"""``python -m dualcache_diffusers``: the same as the ``dualcache`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
