"""Kafka plumbing: clients, delivery, metadata, tables materialised from topics, and the client side of the loop."""
