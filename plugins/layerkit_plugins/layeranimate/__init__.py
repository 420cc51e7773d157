"""Plugin layeranimate (being built)."""
