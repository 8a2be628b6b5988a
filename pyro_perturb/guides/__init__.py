"""Amortised guides, one module per family, named as the model module they match."""
