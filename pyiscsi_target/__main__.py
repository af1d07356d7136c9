"""``python -m pyiscsi_target``: the same command as ``pyiscsi-target``."""

import sys

from .cli import main

sys.exit(main())
