"""Model definitions trained by mispo."""
