"""layerkit: layer-aware video generation as plugins of one trainable toolkit.

Plugins implement the hooks in :mod:`layerkit.hookspecs` with the ``hookimpl`` marker::

    from layerkit import hookimpl

    @hookimpl
    def register_adapters(register):
        register("my_pkg.my_adapter", "my_pkg.adapter:MyAdapter")
"""

from __future__ import annotations

import pluggy

from layerkit.errors import LayerkitError

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("layerkit")

__all__ = ["LayerkitError", "__version__", "hookimpl"]
