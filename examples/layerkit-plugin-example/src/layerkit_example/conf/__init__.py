"""Hydra configs of the example plugin (``pkg://layerkit_example.conf``)."""
