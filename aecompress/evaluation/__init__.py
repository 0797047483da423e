"""Model-level quality: the metrics as a library, the paired z, throughput, and the ``evaluate`` command."""
