"""Searches that choose per-group settings by measuring candidates' quantized error on the
calibration data: the in-graph measurement (:mod:`sensitivity`), migration strength or the
outlier split (:mod:`alpha`), and the clipping ratio (:mod:`clip`)."""
