"""gradient-nb."""
