"""edgeslim."""
