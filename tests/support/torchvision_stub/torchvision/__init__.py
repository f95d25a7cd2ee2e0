"""Import-only stand-in for torchvision, for running ComfyUI in tests without installing torchvision.

ComfyUI imports ``torchvision`` and ``torchvision.transforms`` at module import time (cosmos, cascade, ace),
but the code paths the noflash tests exercise never use them. Put ``tests/support/torchvision_stub`` on
PYTHONPATH.
"""
