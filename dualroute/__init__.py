"""dualroute: dual-layer routed mixture-of-experts for PyTorch."""
