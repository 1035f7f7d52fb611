"""edgeloop cloud tier."""
