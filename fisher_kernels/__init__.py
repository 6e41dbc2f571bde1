"""Triton backend: one module per operation of adafisher_fast/reference.py, same signatures."""
