"""LM1B language modelling with hierarchical attention."""
