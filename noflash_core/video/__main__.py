"""``python -m noflash_core.video``: will this video or image run fit in my VRAM? (see :mod:`.cli`)."""

import sys

from .cli import main

sys.exit(main())
