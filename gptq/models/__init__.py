"""What the loop needs to know about a model family, as data."""
