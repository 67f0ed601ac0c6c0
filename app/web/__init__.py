"""HTTP on the worker: consumes the worker's own state (tables, executor, pool) and a few topics, produces
/health, /metrics, /execute, /tasks, the OpenAPI description and the dashboard page."""
