"""``python -m noflash_core.video``: will this video or image run fit in my VRAM? (see :mod:`noflash_core.vram.cli`)."""

import sys

from ..vram.cli import main

sys.exit(main())
