"""Empty stand-in for ``torchvision.transforms`` (see the parent package's docstring)."""
