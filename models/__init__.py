"""Model development for ACWI Node: networks, synthetic data, training and the model registry."""
