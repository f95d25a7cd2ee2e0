"""Import-only stand-in for ``torchaudio.functional`` (see ``_import_stub.py``)."""

from _import_stub import stub_attribute


def __getattr__(name):
    return stub_attribute(__name__, name)
