"""Model generators: deterministic demo models with outlier channels, and their calibration data."""
