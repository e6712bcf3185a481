"""Generation for serving; loads artifacts with calm_core alone, never imports pipelines.train."""
