"""The device contract: bundle format, signing, MQTT topics and payload schemas.

It imports nothing else of edgefleet; the converter and the fleet import it.
"""
