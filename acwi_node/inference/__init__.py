"""Model loading, preprocessing and analysis of a study's images."""
