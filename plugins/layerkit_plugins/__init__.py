"""layerkit's first-party plugins. Each subpackage registers through the ``layerkit``
entry-point group exactly as a third-party package would."""
