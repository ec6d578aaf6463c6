"""Dashboards: the Grafana dashboard (grafana/) and the built-in page for the embedded mode."""
