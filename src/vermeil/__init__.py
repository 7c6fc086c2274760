"""Vermeil: modular, fast, exact building blocks for modern sequence models.

Importing vermeil has no side effects: no files, no globals, no network.
"""

__version__ = "0.1.0"
