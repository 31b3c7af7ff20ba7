"""The search layer: the only place that knows Ray."""
