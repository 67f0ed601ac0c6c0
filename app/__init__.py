"""loopai-stream: runs LLM-written programs on Kafka requests in a sandbox and writes their results."""

__version__ = "0.1.0"
