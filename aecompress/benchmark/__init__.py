"""``aecompress benchmark``: every method at the same stored bytes, measured by one evaluator."""
