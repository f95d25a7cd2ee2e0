"""Import-only stand-in for ``spandrel`` (see ``_import_stub.py``): ComfyUI's upscale-model nodes import it. Without
them, frontend 1.27's model-to-node table has a missing entry and it cannot create VAELoader or other loaders."""

from _import_stub import stub_attribute


def __getattr__(name):
    return stub_attribute(__name__, name)
