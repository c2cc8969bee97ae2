"""Command-line front ends of the agent side (thin: they call the library)."""
