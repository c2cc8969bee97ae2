"""The API's request handlers, one module per area of the fleet.

Each handler is a function ``handler(exchange, call)``: the request's plumbing
(:class:`~edgefleet.fleet.handlers._exchange.Exchange`: bodies read within a limit, JSON
written) and what the route matched (:class:`~edgefleet.fleet.handlers._exchange.Call`).
:data:`edgefleet.fleet.api.ROUTES` is the one table that maps a method and a path to a
handler and the role it needs; the modules here never route.

- :mod:`.public`: health, the contract, metrics, the web page (no token)
- :mod:`.downloads`: bundles and deltas, with byte ranges (no token)
- :mod:`.status`: the overview, the audit history, the event stream
- :mod:`.devices`: listing, labelling and removing devices
- :mod:`.groups`: dynamic groups, a device's group and tags
- :mod:`.rollouts`: creating, operating and rolling back rollouts
- :mod:`.models`: model versions, pushing a bundle
- :mod:`.drift`: drift alerts and drift policies
- :mod:`.keys`: the caller's token, the token list, the fleet keyring

Input is checked in :mod:`._checks` before it reaches the controller.
"""
