"""``python -m mmpack`` is the ``mmpack`` command."""

import sys

from mmpack.cli import main

sys.exit(main())
