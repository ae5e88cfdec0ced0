"""Prometheus metrics as plain values, where they are recorded, and reward telemetry."""
