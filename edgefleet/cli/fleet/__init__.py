"""``edgefleet fleet`` and ``edgefleet certs``: the command-line face of the fleet controller."""
