"""Who may call what on the controller's API: token roles, and one table of every route.

Each token has a role; each role may do what the roles below it may::

    viewer    read: every GET of /api/v1, the dashboard's data and its event stream
    operator  + rollouts (create, pause, resume, abort, rollback), groups, tags
    admin     + push, keyring, drift policy, the token list, decommission (remove devices)

A token is given as ``NAME:ROLE=SECRET``. ``NAME=SECRET`` (and a bare ``SECRET``, named
"default") keeps meaning what it meant before roles existed, full rights: ``admin``. So
a controller configured before roles keeps working, and an operator opts into lesser
tokens by naming their role.

:data:`ROUTES` is the API: every (method, path template) with the least role it needs
(``None``: no token at all). The server looks a request up here before anything else;
a request that matches no entry needs a token and is answered 404 (405 when the path has
other methods), so a route is reachable only through its entry, and
``tests/test_api_roles.py`` walks every entry with every role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from edgefleet.fleet.errors import AuthError, ForbiddenError

__all__ = ["ROLE_KEY", "ROUTES", "Actor", "Route", "RouteMatch", "Token", "TokenRole",
           "actor_role", "allowed_methods", "check", "describe_tokens", "match", "parse_token",
           "parse_tokens", "tokens_by_secret"]

_MIN_SECRET = 8
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
ROLE_KEY = "actor_role"  # where a relayed request carries its actor's role (fleet.relay)


class TokenRole(str, Enum):
    """What a token may do; each role includes the ones before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: TokenRole) -> bool:
        return self.rank >= needed.rank


_RANKS = {role: rank for rank, role in enumerate(TokenRole)}


@dataclass(frozen=True)
class Token:
    """A token the controller knows: its name (the actor in the history) and its role."""

    name: str
    role: TokenRole

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "role": self.role.value}


class Actor(str):
    """A token's name as every controller method takes its actor, carrying the role so
    the audit trail can write both (a plain ``str`` actor has no role: the controller)."""

    role: TokenRole

    def __new__(cls, name: str, role: TokenRole) -> Actor:
        actor = super().__new__(cls, name)
        actor.role = role
        return actor

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        """A copy (``dataclasses.asdict``, pickle) is the plain name: what is stored."""
        return (str, (str(self),))


def actor_role(actor: str) -> TokenRole | None:
    return actor.role if isinstance(actor, Actor) else None


# --- tokens ------------------------------------------------------------------------------

def parse_token(spec: str) -> tuple[str, Token]:
    """``NAME:ROLE=SECRET``, ``NAME=SECRET`` (admin) or ``SECRET`` (admin, "default")."""
    head, sep, secret = spec.partition("=")
    if not sep:
        head, secret = "default", spec
    name, colon, role_text = head.partition(":")
    role = _role(role_text, name) if colon else TokenRole.ADMIN
    if not _TOKEN_NAME.match(name):
        raise AuthError(f"token name {name[:80]!r} is not allowed",
                        hint="1-64 letters, digits, '.', '_', '@' or '-': --token "
                             "NAME:ROLE=SECRET")
    if len(secret) < _MIN_SECRET:
        raise AuthError(f"token {name!r} is shorter than {_MIN_SECRET} characters",
                        hint="use a long random secret: python -c 'import secrets; "
                             "print(secrets.token_urlsafe())'")
    return secret, Token(name, role)


def _role(text: str, name: str) -> TokenRole:
    try:
        return TokenRole(text)
    except ValueError:
        raise AuthError(f"token {name!r} has role {text[:40]!r}, which is not a role",
                        hint="one of " + ", ".join(r.value for r in TokenRole)
                             + ": --token NAME:ROLE=SECRET") from None


def parse_tokens(specs: list[str]) -> dict[str, Token]:
    """Every ``--token`` spec -> {secret: token}; one secret given twice is refused."""
    tokens: dict[str, Token] = {}
    for spec in specs:
        secret, token = parse_token(spec)
        if secret in tokens:
            raise AuthError(f"tokens {tokens[secret].name!r} and {token.name!r} have the same "
                            "secret", hint="give every token its own secret")
        tokens[secret] = token
    return tokens


def tokens_by_secret(tokens: dict[str, str] | dict[str, Token]) -> dict[str, Token]:
    """{secret: token}; a plain name (``{secret: name}``, before roles) is an admin's."""
    return {secret: token if isinstance(token, Token) else Token(token, TokenRole.ADMIN)
            for secret, token in tokens.items()}


# --- the route table ---------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """One endpoint: ``method`` (GET also answers HEAD), a path template whose ``{name}``
    is one path segment and ``{name...}`` the rest of the path, the least role it needs
    (None: no token) and the name of the server's handler."""

    method: str
    template: str
    role: TokenRole | None
    handler: str
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _compile(self.template))


@dataclass(frozen=True)
class RouteMatch:
    route: Route
    params: dict[str, str]


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{\w+(?:\.\.\.)?\})", template)
    regex = "".join(
        (f"(?P<{p[1:-4]}>.*)" if p.endswith("...}") else f"(?P<{p[1:-1]}>[^/]+)")
        if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{regex}$")


_V, _O, _A = TokenRole.VIEWER, TokenRole.OPERATOR, TokenRole.ADMIN
ROUTES: tuple[Route, ...] = (
    # no token: liveness, downloads, Prometheus, the page itself (its data needs a token)
    Route("GET", "/healthz", None, "healthz"),
    Route("GET", "/bundles/{name...}", None, "bundle"),  # any name: 404 unless stored
    Route("GET", "/metrics", None, "metrics"),
    Route("GET", "/", None, "dashboard"),
    Route("GET", "/dashboard", None, "dashboard"),
    Route("GET", "/dashboard/{path...}", None, "dashboard"),
    # viewer: reading
    Route("GET", "/api/v1/whoami", _V, "whoami"),
    Route("GET", "/api/v1/overview", _V, "overview"),
    Route("GET", "/api/v1/stream", _V, "stream"),
    Route("GET", "/api/v1/devices", _V, "devices"),
    Route("GET", "/api/v1/models", _V, "models"),
    Route("GET", "/api/v1/rollouts", _V, "rollouts"),
    Route("GET", "/api/v1/rollouts/{rollout}", _V, "rollout"),
    Route("GET", "/api/v1/history", _V, "history"),
    Route("GET", "/api/v1/keyring", _V, "keyring"),
    Route("GET", "/api/v1/alerts", _V, "alerts"),
    Route("GET", "/api/v1/drift", _V, "drift"),
    # operator: rollouts, groups, tags
    Route("POST", "/api/v1/rollouts", _O, "create_rollout"),
    Route("POST", "/api/v1/rollouts/{rollout}/{verb}", _O, "operate"),
    Route("POST", "/api/v1/rollback", _O, "rollback_group"),
    Route("POST", "/api/v1/devices/group", _O, "set_group"),
    Route("POST", "/api/v1/devices/{device}/tags", _O, "tag"),
    # admin: what reaches every device or changes what the fleet trusts, and who is in it
    Route("POST", "/api/v1/models", _A, "push"),
    Route("POST", "/api/v1/keyring", _A, "publish_keyring"),
    Route("POST", "/api/v1/drift/{model}", _A, "set_drift_policy"),
    Route("GET", "/api/v1/tokens", _A, "tokens"),
    Route("DELETE", "/api/v1/devices/{device}", _A, "remove_device"),
    Route("POST", "/api/v1/devices/remove", _A, "remove_devices"),
)


def match(method: str, path: str) -> RouteMatch | None:
    """The entry ``method path`` calls (HEAD is GET), with its path parameters."""
    wanted = "GET" if method == "HEAD" else method
    for route in ROUTES:
        if route.method == wanted and (found := route.pattern.match(path)):
            return RouteMatch(route, found.groupdict())
    return None


def allowed_methods(path: str) -> list[str]:
    """The methods some entry takes at ``path`` (for a 405's ``Allow``)."""
    methods = {r.method for r in ROUTES if r.pattern.match(path)}
    return sorted(methods | ({"HEAD"} if "GET" in methods else set()))


def check(caller: Actor, route: Route, what: str) -> None:
    """ForbiddenError (403) naming the role ``route`` needs, when ``caller``'s token lacks it."""
    needed = route.role
    if needed is None or caller.role.allows(needed):
        return
    raise ForbiddenError(
        f"{what} needs the {needed.value} role; token {str(caller)!r} is a {caller.role.value}",
        role=needed.value,
        hint=f"use a token with role {needed.value} or above (the controller's --token "
             f"NAME:{needed.value}=SECRET)")


def describe_tokens(tokens: dict[str, Token]) -> list[dict[str, Any]]:
    """Names and roles, never secrets, sorted by name."""
    return sorted((t.as_dict() for t in tokens.values()), key=lambda t: t["name"])
