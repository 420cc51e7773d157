"""The toy LayerAnimate: a small ToonCrafter (VAE, UNet) and a Layer ControlNet trained on the shapes
world on two CPU cores. See ``weights/MODEL_CARD.md`` and ``docs/toy_layeranimate.md``."""
