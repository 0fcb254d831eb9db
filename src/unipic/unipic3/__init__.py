"""UniPic-3 (placeholder while building)."""
