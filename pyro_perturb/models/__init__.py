"""Generative models of the zoo, one module per paper family (see each module's docstring)."""
