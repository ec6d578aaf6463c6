"""The ClickHouse side of surgeflow: schema migrations, named KPI queries and period reports."""
