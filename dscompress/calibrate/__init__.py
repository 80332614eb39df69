"""dscompress.calibrate."""
