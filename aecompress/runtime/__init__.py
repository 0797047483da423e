"""The run-time form: compact exports that decode their weights just in time, and its benchmark."""
