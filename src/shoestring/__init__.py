"""shoestring: train and fine-tune LLMs for the most model quality per dollar."""

__version__ = "0.1.0"
