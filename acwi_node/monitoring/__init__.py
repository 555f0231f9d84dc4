"""Model monitoring: each model version's recent studies compared with its baseline."""
