"""dscompress.compress."""
