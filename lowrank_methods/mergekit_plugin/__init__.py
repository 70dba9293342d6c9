"""The bridge that lets the stock ``mergekit-yaml`` run this package's methods (see docs/mergekit.md).

The start-up hook (``_lowrank_methods_hook``, installed by a ``.pth``/``.start`` file) calls
``register()`` once ``mergekit.merge_methods`` has finished importing, and ``patch()`` once
``mergekit.merge`` has. Nothing here runs, and nothing heavy is imported, unless mergekit is imported.
"""

from __future__ import annotations


def register() -> None:
    """Add our methods (and LoRE) to mergekit's registry."""
    from lowrank_methods.mergekit_plugin.methods import register_methods

    register_methods()


def patch() -> None:
    """Route recipes of our methods to our engine and read ``base+lora`` directly (``patches.py``)."""
    from lowrank_methods.mergekit_plugin.patches import install_patches

    register()
    install_patches()
