"""dscompress.models."""
