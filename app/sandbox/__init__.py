"""The sandbox: pre-started executor processes that run untrusted programs under OS limits."""
