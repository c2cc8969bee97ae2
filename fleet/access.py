"""Who may call what on the controller's API: token roles, and one table of every route.

Each token has a role; each role may do what the roles below it may::

    viewer    read: every GET of /api/v1, the dashboard's data and its event stream
    operator  + rollouts (create, pause, resume, abort, rollback), groups, tags
    admin     + push, keyring, drift policy, the token list, decommission (remove devices)

A token is given as ``NAME:ROLE=SECRET``. ``NAME=SECRET`` (and a bare ``SECRET``, named
"default") keeps meaning what it meant before roles existed, full rights: ``admin``. So
a controller configured before roles keeps working, and an operator opts into lesser
tokens by naming their role.

The API's route table (``fleet.api.ROUTES``) gives every (method, path template) the least
role it needs (``None``: no token at all); the server checks it before any handler runs,
and ``tests/test_api_roles.py`` walks every entry with every role.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from edgefleet.fleet.errors import AuthError, ForbiddenError

__all__ = ["ROLE_KEY", "Actor", "Token", "TokenRole", "actor_role", "check",
           "describe_tokens", "parse_token", "parse_tokens", "tokens_by_secret"]

_MIN_SECRET = 8
_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", re.ASCII)  # fullmatch
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
    elif not secret.strip("="):  # "c2VjcmV0==": a bare secret's padding, not NAME=SECRET
        raise AuthError("a token spec ends in '=': a bare secret with '=' padding reads as "
                        "NAME=SECRET with an empty secret",
                        hint="name the token: --token NAME:ROLE=SECRET (the secret may hold "
                             "'=')")
    name, colon, role_text = head.partition(":")
    role = _role(role_text, name) if colon else TokenRole.ADMIN
    if not _TOKEN_NAME.fullmatch(name):
        raise AuthError(f"token name {name[:80]!r} is not allowed",
                        hint="1-64 letters, digits, '.', '_', '@' or '-': --token "
                             "NAME:ROLE=SECRET")
    if not (secret.isascii() and secret.isprintable()) or secret != secret.strip():
        raise AuthError(f"token {name!r}: its secret holds spaces at an end, or characters "
                        "outside printable ASCII, which no HTTP client sends as written",
                        hint="use a long random secret: python -c 'import secrets; "
                             "print(secrets.token_urlsafe())'")
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
    """Every ``--token`` spec -> {secret: token}; one secret or one name given twice is
    refused (the history names a token: two of one name could not be told apart)."""
    tokens: dict[str, Token] = {}
    for spec in specs:
        secret, token = parse_token(spec)
        if secret in tokens:
            raise AuthError(f"tokens {tokens[secret].name!r} and {token.name!r} have the same "
                            "secret", hint="give every token its own secret")
        if any(other.name == token.name for other in tokens.values()):
            bare = " (a bare SECRET is named 'default')" if token.name == "default" else ""
            raise AuthError(f"two tokens are named {token.name!r}{bare}",
                            hint="give every token its own name: --token NAME:ROLE=SECRET")
        tokens[secret] = token
    return tokens


def tokens_by_secret(tokens: dict[str, str] | dict[str, Token]) -> dict[str, Token]:
    """{secret: token}; a plain name (``{secret: name}``, before roles) is an admin's."""
    return {secret: token if isinstance(token, Token) else Token(token, TokenRole.ADMIN)
            for secret, token in tokens.items()}


def check(caller: Actor, needed: TokenRole | None, what: str) -> None:
    """ForbiddenError (403) naming the role ``needed``, when ``caller``'s token lacks it."""
    if needed is None or caller.role.allows(needed):
        return
    raise ForbiddenError(
        f"{what} needs the {needed.value} role; token {str(caller)!r} is "
        f"{_article(caller.role.value)} {caller.role.value}",
        role=needed.value,
        hint=f"use a token with role {needed.value} or above (the controller's --token "
             f"NAME:{needed.value}=SECRET)")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def describe_tokens(tokens: dict[str, Token]) -> list[dict[str, Any]]:
    """Names and roles, never secrets, sorted by name."""
    return sorted((t.as_dict() for t in tokens.values()), key=lambda t: t["name"])
