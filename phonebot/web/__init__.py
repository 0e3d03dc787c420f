"""The HTTP server: app assembly, one APIRouter per concern, the typed app services, keys
and guards in front of every route, error answers, graceful shutdown and worker processes.
"""
