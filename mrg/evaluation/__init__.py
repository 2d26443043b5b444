"""Scoring what the model writes: metrics, baselines, fidelity, text quality, the card facts."""
