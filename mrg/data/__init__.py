"""Report text, sections, datasets and dataset preparation."""
