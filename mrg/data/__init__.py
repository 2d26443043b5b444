"""Data: studies and their views, datasets, OpenI reports, label-matched pairs, the language corpus."""
