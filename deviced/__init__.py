"""The deviced daemon."""
