"""S3 fixture placeholder; the SeaweedFS harness replaces this module."""
