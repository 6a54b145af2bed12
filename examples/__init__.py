"""Runnable examples of durable functions, and their tests (examples/test_examples.py)."""
