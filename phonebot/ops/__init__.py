"""Running the server in production: logs with secrets masked (text or JSON), Prometheus
metrics, resource-usage diagnostics and thread pools started whole.
"""
