"""The model tables of the VRAM estimate (:mod:`.families`, :mod:`.encoders`) and the documented command
``python -m noflash_core.video``; the estimator itself is :mod:`noflash_core.vram`."""
