"""Updates on the device: a pure state machine, A/B slots, and the I/O that drives them."""
