"""The toy LayerFlow: a tiny CogVideoX-shaped model trained on the shapes world on CPU, committed
in ``weights/`` (a diffusers-format directory plus the three stages' weights), and the default
of ``layerkit sample``.

- ``model``: the toy components' configs (VAE, transformer, T5, scheduler);
- ``train_vae``: trains the VAE on shapes-world clips and writes the base directory;
- ``export``: copies the base directory and each stage's weights into ``weights/`` (fp16);
- ``evaluate``: stage 1 alone vs all three stages, generation and the conditional tasks, on
  held-out shapes clips (the table of the model card);
- ``diagnose``: the figures behind the model card's "Why" section;
- ``reproduce.sh``: every command, in order.
"""
