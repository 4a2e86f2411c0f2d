"""Levers applied to a plain model from outside: each module owns how to apply it and what it costs."""
