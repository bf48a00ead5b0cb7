"""Heads trained from the token cache, one module each, on the shared base in ``base.py``."""
