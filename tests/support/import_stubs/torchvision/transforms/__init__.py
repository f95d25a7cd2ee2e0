"""Import-only stand-in for ``torchvision.transforms`` (see ``_import_stub.py``)."""

from _import_stub import stub_attribute


def __getattr__(name):
    return stub_attribute(__name__, name)
