"""Small helpers every layer uses: files never half-written, precision names, derived seeds, counted nouns,
one-line option errors."""
