"""Text and calibration data: data specs, corpora, the token cache and calibration statistics."""
