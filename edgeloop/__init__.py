"""edgeloop: the command line, the embedded demo, and broker process management."""
