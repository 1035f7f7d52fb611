"""edgeloop simulators tier."""
