"""The bottom layer: errors, the budget accountant, stored forms, weight groups, codes and files.

Nothing here knows Lightning or transformers; every other layer builds on it.
"""
