"""The toy transparent model: Layer-Animate's stage 2 trained end to end on shapes-world RGBA
sprites on two CPU cores (see MODEL_CARD.md). ``weights/`` holds the committed files the
``toy_transparent`` and ``toy_transparent_baseline`` experiments load."""
