"""``python -m noflash_core.distributed``: see :mod:`noflash_core.distributed.bench`."""

from .bench import main

if __name__ == "__main__":
    main()
