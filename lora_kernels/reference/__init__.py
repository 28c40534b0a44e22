"""Plain PyTorch versions of each op, forward and backward, written for clarity: the fallback
backend everywhere and the oracle of the tests."""
