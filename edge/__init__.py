"""edgeloop edge tier."""
