"""Measuring what a quality score does for recognition (EDC, ERC, identification)."""
