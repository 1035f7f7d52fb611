"""edgeloop protocols tier."""
