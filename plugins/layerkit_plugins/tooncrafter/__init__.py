"""Plugin tooncrafter (being built)."""
