"""The generator: answers improvement requests with candidate programs (docs/improvement.md)."""
