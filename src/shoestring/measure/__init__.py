"""Measuring what a run uses: memory accounting (saved activations, a model's state bytes, a
process's or device's peak). A leaf: it knows nothing of models, levers or strategies."""
