"""iso-proxy: an ISO 8583 switch proxy (trio shell around a pure core)."""
