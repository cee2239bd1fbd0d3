"""Fitting alpha to real text (calibrate) and measuring entropy calibration (evaluate)."""
