"""``python -m noflash_core.vram``: the same CLI as ``python -m noflash_core.video`` (see :mod:`.cli`)."""

import sys

from .cli import main

sys.exit(main())
