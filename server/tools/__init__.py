"""Offline tools that run their own steering engine: ZeroTuning calibration's engine and the fTRI expert finder."""
