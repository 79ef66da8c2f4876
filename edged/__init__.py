"""The edged daemon."""
