"""Who may act for a profile: the authorizer AUTH_MODE chooses, and commands that make keys and
mint tokens.

In `jwt` mode every call carries `authorization: Bearer <token>`, a JWT whose claims are `sub`
(the calling service or user), `profiles` (the profile ids it may act for), `iat` and `exp`
(at most AUTH_JWT_MAX_LIFETIME_SECONDS apart), and optionally `scope` (`operator`: cross-profile
reads only; `worker`: LeaseJobs, then updates of the jobs it holds, whatever their profile;
see the server interceptor), `aud` and `iss`. Where AUTH_JWT_AUDIENCE is set, `aud`
must name it (one name or a list: a token for PublishJob names the Publisher and Jobs, whom the
Publisher calls with the caller's own token); where AUTH_JWT_ISSUER is set, `iss` must equal it.

Signatures: ES256, checked with public keys only (AUTH_JWT_PUBLIC_KEY: one PEM key, or a JWK set
whose keys are picked by the token's `kid`, so that a new key can be added before tokens are
signed with it and the old one dropped once its tokens have expired), so a service can check
tokens but never make one; or HS256 with a shared secret (AUTH_JWT_SECRET), where every holder
of the secret can mint any token (tests and single-machine use only).

    python -m services.runtime.auth keygen key-2026-12.pem          # a private key, 0600
    python -m services.runtime.auth jwks 2026-12=key-2026-12.pem    # its public half, as a set
    python -m services.runtime.auth mint --private-key key-2026-12.pem --kid 2026-12 \
        --sub ops --profiles store-1,store-2 --aud jobs.v1.JobService --iss video-pipeline
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc.aio import ServicerContext
from jwt.algorithms import ECAlgorithm

from services.runtime.call_context import AUTHORIZATION_METADATA_KEY, Caller
from services.runtime.errors import PermissionDenied, Unauthenticated
from services.runtime.interceptors.server import Authorizer, allow_any_caller
from services.runtime.settings import Settings

OPERATOR_SCOPE = "operator"
WORKER_SCOPE = "worker"
_BEARER = "bearer "
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "profiles"]
# Clock skew tolerated between the host that minted a token and the one checking it.
LEEWAY_SECONDS = 30

# A verification key: an HS256 secret, or an ES256 public key.
VerificationKey = str | ec.EllipticCurvePublicKey


def _key_text(value: str) -> str:
    """PEM or JSON text as given, or the contents of the file it names."""
    stripped = value.lstrip()
    if stripped.startswith(("-----BEGIN", "{")):
        return value
    return Path(value).read_text()


def public_keys(value: str) -> dict[str | None, ec.EllipticCurvePublicKey]:
    """AUTH_JWT_PUBLIC_KEY's keys by `kid`: a PEM public key (kid None: it checks every token),
    or a JWK set. Refuses private keys, which a service must never hold."""
    text = _key_text(value)
    if text.lstrip().startswith("{"):
        return _jwk_set(json.loads(text))
    if "PRIVATE KEY" in text:
        raise ValueError("that is a private key; give services the public key only")
    key = serialization.load_pem_public_key(text.encode())
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the public key must be an ES256 key (EC, curve P-256)")
    return {None: key}


def _jwk_set(document: Any) -> dict[str | None, ec.EllipticCurvePublicKey]:
    """`{"keys": [{"kid": …, "kty": "EC", "crv": "P-256", "x": …, "y": …}, …]}` by kid."""
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError('a JWK set is {"keys": [...]} with at least one key')
    keys: dict[str | None, ec.EllipticCurvePublicKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or (entry.get("kty"), entry.get("crv")) != ("EC", "P-256"):
            raise ValueError("every key of the JWK set must be an ES256 key (kty EC, crv P-256)")
        if "d" in entry:
            raise ValueError("the JWK set holds a private key; give services the public keys only")
        kid = entry.get("kid")
        if not isinstance(kid, str) or not kid or kid in keys:
            raise ValueError("every key of the JWK set needs a kid of its own")
        try:
            keys[kid] = ECAlgorithm.from_jwk(entry)
        except jwt.InvalidKeyError as error:
            raise ValueError(f"key {kid!r} of the JWK set: {error}") from None
    return keys


def _bearer_token(context: ServicerContext) -> tuple[str, str]:
    """The token and the whole metadata value it came in."""
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION_METADATA_KEY:
            if isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
                return value[len(_BEARER) :].strip(), value
            break
    raise Unauthenticated(
        "authorization metadata is required: 'Bearer <token>' "
        "(python -m services.runtime.auth mint)"
    )


class JwtAuthorizer:
    """Proves the caller with a signed JWT; one algorithm, chosen by the keys it is given."""

    def __init__(
        self,
        keys: dict[str | None, VerificationKey],
        algorithm: str,
        *,
        audience: str = "",
        issuer: str = "",
        max_lifetime_seconds: float,
    ) -> None:
        self._keys = keys
        self._algorithm = algorithm
        self._audience = audience
        self._issuer = issuer
        self._max_lifetime_seconds = max_lifetime_seconds
        self._required = [
            *_REQUIRED_CLAIMS,
            *(["aud"] if audience else []),
            *(["iss"] if issuer else []),
        ]

    @classmethod
    def from_settings(cls, settings: Settings) -> "JwtAuthorizer":
        keys: dict[str | None, VerificationKey]
        if settings.auth_jwt_secret:
            keys, algorithm = {None: settings.auth_jwt_secret}, "HS256"
        else:
            try:
                keys, algorithm = dict(public_keys(settings.auth_jwt_public_key)), "ES256"
            except (OSError, ValueError) as error:
                raise SystemExit(f"AUTH_JWT_PUBLIC_KEY: {error}") from None
        return cls(
            keys,
            algorithm,
            audience=settings.auth_jwt_audience,
            issuer=settings.auth_jwt_issuer,
            max_lifetime_seconds=settings.auth_jwt_max_lifetime_seconds,
        )

    def _key_for(self, token: str) -> VerificationKey:
        """The key the token's `kid` names; a lone key checks every token."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"the token is not valid: {error}") from None
        if kid in self._keys:
            return self._keys[kid]
        if len(self._keys) == 1 and (None in self._keys or kid is None):
            return next(iter(self._keys.values()))
        known = ", ".join(sorted(k for k in self._keys if k is not None))
        raise Unauthenticated(
            f"the token's key id (kid) {kid!r} is not one this service accepts ({known})"
        )

    def claims(self, token: str) -> dict[str, Any]:
        """The verified claims; Unauthenticated saying what is wrong otherwise."""
        try:
            claims = jwt.decode(
                token,
                self._key_for(token),
                algorithms=[self._algorithm],
                audience=self._audience or None,
                issuer=self._issuer or None,
                leeway=LEEWAY_SECONDS,
                options={"require": self._required, "verify_aud": bool(self._audience)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired; mint a new one") from None
        except jwt.MissingRequiredClaimError as error:
            raise Unauthenticated(
                f"the token has no {error.claim!r} claim, which this service requires"
            ) from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"the token is not meant for this service: its aud must name {self._audience!r}"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"the token's iss must be {self._issuer!r}") from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"the token is not valid: {error}") from None
        if not all(type(claims[name]) in (int, float) for name in ("iat", "exp")):
            raise Unauthenticated("the token's iat and exp must be numbers of seconds")
        lifetime = claims["exp"] - claims["iat"]
        if lifetime > self._max_lifetime_seconds:
            raise Unauthenticated(
                f"the token lives {lifetime:.0f}s from iat to exp, longer than the "
                f"{self._max_lifetime_seconds:.0f}s this service accepts "
                "(AUTH_JWT_MAX_LIFETIME_SECONDS); mint one with a shorter --ttl"
            )
        profiles = claims["profiles"]
        if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
            raise Unauthenticated("the token's profiles claim must be a list of profile ids")
        if not isinstance(claims["sub"], str) or not claims["sub"]:
            raise Unauthenticated("the token's sub claim must name the caller")
        return claims

    def __call__(self, profile_id: str | None, context: ServicerContext, method: str) -> Caller:
        token, authorization = _bearer_token(context)
        claims = self.claims(token)
        caller = Caller(
            subject=claims["sub"],
            operator=_has_scope(claims.get("scope"), OPERATOR_SCOPE),
            worker=_has_scope(claims.get("scope"), WORKER_SCOPE),
            authorization=authorization,
        )
        # A scoped token is held to its scope's methods by the interceptor; a worker acts for
        # the profile of each job it holds, which the database checks against its lease.
        scoped = caller.operator or caller.worker
        if profile_id is not None and not scoped and profile_id not in claims["profiles"]:
            raise PermissionDenied(
                f"the token of {caller.subject} may not act for profile {profile_id}"
            )
        return caller


def _has_scope(scope: Any, name: str) -> bool:
    """`scope` as one name or as OAuth's space-separated list."""
    return isinstance(scope, str) and name in scope.split()


def authorizer_for(settings: Settings) -> Authorizer:
    """The authorizer AUTH_MODE names."""
    if settings.auth_mode == "jwt":
        return JwtAuthorizer.from_settings(settings)
    return allow_any_caller


def mint_token(
    key: str,
    *,
    sub: str,
    profiles: Sequence[str],
    ttl_seconds: float = 3600,
    operator: bool = False,
    worker: bool = False,
    algorithm: str = "HS256",
    key_id: str | None = None,
    audience: Sequence[str] = (),
    issuer: str | None = None,
    extra_claims: dict[str, Any] | None = None,
) -> str:
    """A signed token: HS256 with a shared secret, ES256 with a private key (PEM); `key_id`
    becomes the header's `kid`, `audience` the `aud` list."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "profiles": list(profiles),
        "iat": now,
        "exp": now + int(ttl_seconds),
    }
    scopes = [name for name, held in ((OPERATOR_SCOPE, operator), (WORKER_SCOPE, worker)) if held]
    if scopes:
        claims["scope"] = " ".join(scopes)
    if audience:
        claims["aud"] = list(audience)
    if issuer:
        claims["iss"] = issuer
    headers = {"kid": key_id} if key_id else None
    return jwt.encode(claims | (extra_claims or {}), key, algorithm=algorithm, headers=headers)


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _mint(args: argparse.Namespace) -> None:
    if args.private_key:
        key, algorithm = _key_text(args.private_key), "ES256"
    else:
        key, algorithm = os.environ.get("AUTH_JWT_SECRET", ""), "HS256"
        if not key:
            sys.exit("give --private-key (ES256), or set AUTH_JWT_SECRET (HS256)")
    print(
        mint_token(
            key,
            sub=args.sub,
            profiles=_names(args.profiles),
            ttl_seconds=args.ttl,
            operator=args.operator,
            worker=args.worker,
            algorithm=algorithm,
            key_id=args.kid or None,
            audience=_names(args.aud),
            issuer=args.iss or None,
        )
    )


def _keygen(args: argparse.Namespace) -> None:
    """A new ES256 private key, written readable by its owner only."""
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    descriptor = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)


def _jwks(args: argparse.Namespace) -> None:
    """The public halves of the named keys, as the JWK set AUTH_JWT_PUBLIC_KEY takes."""
    keys = []
    for entry in args.keys:
        kid, _, path = entry.partition("=")
        if not kid or not path:
            sys.exit(f"name each key as KID=PEM_FILE, got {entry!r}")
        text = Path(path).read_text()
        if "PRIVATE KEY" in text:
            key = serialization.load_pem_private_key(text.encode(), password=None).public_key()
        else:
            key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            sys.exit(f"{path} is not an EC (ES256) key")
        jwk = ECAlgorithm.to_jwk(key, as_dict=True)
        keys.append(jwk | {"kid": kid, "alg": "ES256", "use": "sig"})
    print(json.dumps({"keys": keys}, indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.runtime.auth",
        description="Keys and tokens for AUTH_MODE=jwt (grpcurl: -H 'authorization: Bearer …').",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    mint = commands.add_parser("mint", help="print a signed token")
    mint.add_argument("--sub", required=True, help="the calling service or user")
    mint.add_argument("--profiles", default="", help="comma-separated profile ids")
    mint.add_argument("--ttl", type=float, default=3600, help="seconds until it expires")
    mint.add_argument("--operator", action="store_true", help="scope operator")
    mint.add_argument("--worker", action="store_true", help="scope worker (LeaseJobs)")
    mint.add_argument(
        "--private-key",
        default=os.environ.get("AUTH_JWT_PRIVATE_KEY", ""),
        help="ES256 private key, PEM or file path (default AUTH_JWT_PRIVATE_KEY); "
        "without it, HS256 with AUTH_JWT_SECRET",
    )
    mint.add_argument("--kid", default="", help="the key's id in the services' JWK set")
    mint.add_argument(
        "--aud",
        default="",
        help="comma-separated audiences: the gRPC names of the services the token is for, "
        "e.g. publisher.v1.PublisherService,jobs.v1.JobService",
    )
    mint.add_argument("--iss", default="", help="the issuer the services expect")
    mint.set_defaults(run=_mint)
    keygen = commands.add_parser("keygen", help="write a new ES256 private key (PEM, 0600)")
    keygen.add_argument("path", help="where to write it; never overwritten")
    keygen.set_defaults(run=_keygen)
    jwks = commands.add_parser(
        "jwks", help="print the JWK set of public keys to give the services (AUTH_JWT_PUBLIC_KEY)"
    )
    jwks.add_argument("keys", nargs="+", metavar="KID=PEM_FILE", help="a key (private or public)")
    jwks.set_defaults(run=_jwks)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
