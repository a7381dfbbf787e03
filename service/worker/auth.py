"""Who may listen: CORS for browsers on other origins, and signed subscriber tokens (JWT).

Both are decided once per request head, on the accept path; nothing here lives per connection.

CORS (``--cors-origins``): ``*`` answers any origin with ``Access-Control-Allow-Origin: *`` and
no credentials; a comma-separated list answers only those origins, echoing the one that asked, with
``Access-Control-Allow-Credentials: true`` (``EventSource(url, {withCredentials: true})``); an empty
value sends no CORS headers at all. A preflight ``OPTIONS`` gets 204 with the methods and headers a
subscriber uses (``Last-Event-ID``, ``Authorization``, ``Cache-Control``), or 403 for an origin
outside the list.

Tokens: channels matching ``--private-channels`` (comma-separated glob patterns such as
``private-*``), or every channel with ``--require-token``, need a JWT given as ``?token=`` (an
``EventSource`` cannot set headers) or ``Authorization: Bearer``. Its signature is checked with
PyJWT's algorithm objects (see :meth:`TokenCheck._decode` for why not ``jwt.decode``): HS256
with the shared secret (``--token-secret-file`` or ``COMET_TOKEN_SECRET``; never a flag, so it
never shows in ``ps``; one secret per line: the first is the current one, the others are still
accepted while a rotation runs), or RS256 / ES256 with ``--token-public-key-file``. Claims: ``exp``
(required), ``sub`` (optional), ``channels`` (names or glob patterns the token may read).
Missing → 401; a bad signature, an expired token or a channel the token does not name → 403;
each with a one-line reason and its own counter. The token itself is never logged.

A decoded token is remembered (bounded, keyed by its text) so a client that reconnects with the
same token costs a dictionary look-up, not another signature check; its ``exp`` is checked again
on every use.
"""

from __future__ import annotations

import binascii
import fnmatch
import functools
import json
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from service.contracts import ENV_TOKEN_SECRET, secret_lines
from service.worker.http import HttpError

CACHE_SIZE = 4096
PREFLIGHT_HEADERS = "Last-Event-ID, Authorization, Cache-Control, Accept"
PREFLIGHT_METHODS = "GET, HEAD, OPTIONS"


class Channels:
    """The channels a comma-separated list of names and ``fnmatch`` globs (``*``, ``?``,
    ``[...]``) names: ``--private-channels``, or a token's ``channels`` claim. A plain name is a
    set look-up; only the globs become a regex, one per distinct list of globs. A token that
    grants its user's own channel (``["private-42"]``) compiled a regex of its own on its first
    check: ~100 µs, five accepts' worth (docs/benchmarks.md, "A first-time token per user")."""

    __slots__ = ("names", "glob")

    def __init__(self, names: frozenset[str], glob: re.Pattern[str] | None) -> None:
        self.names = names
        self.glob = glob

    def match(self, channel: str) -> bool:
        if channel in self.names:
            return True
        glob = self.glob
        return glob is not None and glob.match(channel) is not None


_GLOB = re.compile(r"[*?\[]")  # what fnmatch.translate does not take literally


@functools.lru_cache(maxsize=1024)
def _patterns(text: str) -> Channels | None:
    """The names and globs of a comma-separated list (None: it names nothing); the lists an
    issuer hands to many users (``private-*``) are made once."""
    names: list[str] = []
    globs: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            (globs if _GLOB.search(part) else names).append(part)
    if not names and not globs:
        return None
    return Channels(frozenset(names), _glob_regex(tuple(globs)) if globs else None)


@functools.lru_cache(maxsize=256)
def _glob_regex(globs: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for a list of globs; a few lists (an issuer's grants) cached."""
    return re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))


# ---- CORS ----------------------------------------------------------------------------------------
class Cors:
    """The CORS answer of every subscriber route, computed once per origin list."""

    __slots__ = ("any", "origins", "_any_bytes", "_bytes", "_other")

    def __init__(self, origins: str) -> None:
        text = origins.strip()
        self.any = text == "*"
        self.origins = (
            frozenset() if self.any else frozenset(o.strip() for o in text.split(",") if o.strip())
        )
        self._any_bytes = b"Access-Control-Allow-Origin: *\r\n"
        # Built once per allowed origin: answering a request allocates nothing.
        self._bytes = {
            o: b"Access-Control-Allow-Origin: %s\r\nAccess-Control-Allow-Credentials: true\r\n"
            b"Vary: Origin\r\n" % o.encode("latin-1")
            for o in self.origins
        }
        self._other = b"Vary: Origin\r\n" if self.origins else b""

    def allowed(self, origin: str | None) -> bool:
        return origin is not None and (self.any or origin in self.origins)

    def headers(self, origin: str | None) -> bytes:
        """Header lines (CRLF-terminated) for a response to a request from ``origin``."""
        if origin is None:
            return b""
        if self.any:
            return self._any_bytes
        return self._bytes.get(origin, self._other)

    def preflight(self, origin: str | None) -> bytes | HttpError:
        """The whole answer to an ``OPTIONS`` request."""
        if not self.allowed(origin):
            why = "no Origin header" if origin is None else f"origin {origin!r} is not allowed"
            return HttpError(403, f"CORS preflight refused: {why}")
        return (
            b"HTTP/1.1 204 No Content\r\n"
            + self.headers(origin)
            + b"Access-Control-Allow-Methods: "
            + PREFLIGHT_METHODS.encode()
            + b"\r\n"
            b"Access-Control-Allow-Headers: " + PREFLIGHT_HEADERS.encode() + b"\r\n"
            b"Access-Control-Max-Age: 600\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )


# ---- tokens --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Keys:
    secrets: tuple[bytes, ...]  # HS256: the current secret, then older ones still accepted
    public_key: Any | None  # a cryptography public key object


def load_keys(secret_file: str, public_key_file: str, environ: Any = None) -> Keys:
    """The verification keys; ValueError names the option that is wrong."""
    env = os.environ if environ is None else environ
    secrets: list[bytes] = []
    if secret_file:
        try:
            with open(secret_file, "rb") as f:
                secrets = secret_lines(f.read())
        except OSError as exc:
            raise ValueError(
                f"token-secret-file: cannot read {secret_file}: {exc.strerror or exc}"
            ) from None
        if not secrets:
            raise ValueError(f"token-secret-file: {secret_file} is empty")
    elif env.get(ENV_TOKEN_SECRET):
        secrets = secret_lines(env[ENV_TOKEN_SECRET].encode())
    for n, one in enumerate(secrets, 1):
        if len(one) < 32:
            where = f" (line {n})" if len(secrets) > 1 else ""
            raise ValueError(
                f"token secret{where}: at least 32 bytes are needed for HS256 "
                "(e.g. `openssl rand -hex 32`)"
            )
    public_key = None
    if public_key_file:
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        try:
            with open(public_key_file, "rb") as f:
                public_key = load_pem_public_key(f.read())
        except OSError as exc:
            raise ValueError(
                f"token-public-key-file: cannot read {public_key_file}: {exc.strerror or exc}"
            ) from None
        except ValueError as exc:
            raise ValueError(
                f"token-public-key-file: {public_key_file} is not a PEM public key ({exc})"
            ) from None
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        p256 = isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(
            public_key.curve, ec.SECP256R1
        )
        if not (isinstance(public_key, rsa.RSAPublicKey) or p256):
            raise ValueError(
                f"token-public-key-file: {public_key_file} must be an RSA (RS256) or EC P-256 "
                "(ES256) public key"
            )
    return Keys(tuple(secrets), public_key)


class TokenCheck:
    """Decides whether a subscribe request may read its channel. Counts each refusal."""

    def __init__(
        self, private_channels: str, require_token: bool, keys: Keys, counters: Any = None
    ) -> None:
        self.require_all = require_token
        self.private = _patterns(private_channels)
        self.keys = keys
        self.counters = counters
        self._cache: OrderedDict[str, tuple[float, Channels | None]] = OrderedDict()
        # PyJWT (and the cryptography it loads, ~10 MB of RSS) only in a worker that checks
        # tokens: at 54 workers that is half a gigabyte nobody else needs.
        # alg → (PyJWT algorithm, its keys: HS256's current secret first, then older ones)
        self._verifiers: dict[str, tuple[Any, tuple[Any, ...]]] = {}
        self._headers: dict[str, Any] = {}  # base64url header → parsed (a few per issuer)
        if self.active:
            self._verifiers = _verifiers(keys)

    @property
    def active(self) -> bool:
        return self.require_all or self.private is not None

    def needs_token(self, channel: str) -> bool:
        return self.require_all or (self.private is not None and self.private.match(channel))

    def check(self, channel: str, token: str | None, now: float | None = None) -> float | HttpError:
        """The token's expiry (unix seconds) if it may read ``channel``, else the refusal."""
        if not token:
            return self._refuse(
                "token_missing_total", f"channel {channel!r} needs a token (?token= or Bearer)", 401
            )
        now = time.time() if now is None else now
        claims = self._cache.get(token)
        if claims is None:
            decoded = self._decode(token, now)
            if isinstance(decoded, HttpError):
                return decoded
            claims = decoded
            self._cache[token] = claims
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        exp, allowed = claims
        if exp <= now:
            return self._refuse("token_expired_total", "token expired")
        if allowed is None or not allowed.match(channel):
            return self._refuse(
                "token_forbidden_total", f"token does not grant channel {channel!r}"
            )
        return exp

    def _decode(self, token: str, now: float) -> tuple[float, Channels | None] | HttpError:
        """Verify a compact JWS and read the claims this service uses.

        The signature is checked by PyJWT's algorithm objects (HMAC, RSA, EC from
        ``jwt.algorithms``) with keys prepared once at start. PyJWT's ``decode`` (or ``PyJWS``)
        did the same in 30-50 µs a token, most of it re-validating the key and the claims
        each time, against a ~30 µs accept; this does it in ~9 µs. What it refuses: not three
        base64url segments, a header or payload that is not a JSON object, an ``alg`` other
        than the configured key's (``none`` included; an HS256 token is never checked against
        a public key), any ``crit`` extension, a bad signature, no numeric ``exp``, an expired
        one, and ``nbf`` in the future."""
        signed_text, _, sig_b64 = token.rpartition(".")
        head_b64, _, body_b64 = signed_text.partition(".")
        if not body_b64 or "." in body_b64:
            return self._refuse("token_invalid_total", "token is not a JWT (three parts)")
        try:
            # An issuer's tokens share one header (alg, typ): parsed once, then looked up.
            header = self._headers.get(head_b64)
            if header is None:
                header = _json(_b64decode(head_b64).decode())
                if isinstance(header, dict) and len(self._headers) < 64:
                    self._headers[head_b64] = header
            signature = _b64decode(sig_b64)
            signed = signed_text.encode("ascii")
        except (ValueError, binascii.Error):
            return self._refuse("token_invalid_total", "token is not base64url-encoded JSON")
        if not isinstance(header, dict):
            return self._refuse("token_invalid_total", "token header is not a JSON object")
        verifier = self._verifiers.get(header.get("alg"))  # type: ignore[arg-type]
        if verifier is None:
            return self._refuse("token_invalid_total", "token algorithm is not accepted here")
        if "crit" in header:
            return self._refuse("token_invalid_total", "token has critical JWS extensions")
        algorithm, keys = verifier
        good = False
        for key in keys:  # one, but for the old secrets of a rotation
            try:
                good = algorithm.verify(signed, key, signature)
            except Exception:  # a malformed signature for the key type (e.g. ES256 length)
                good = False
            if good:
                break
        if not good:
            return self._refuse("token_invalid_total", "token signature does not verify")
        try:
            claims = _json(_b64decode(body_b64).decode())
        except (ValueError, binascii.Error):
            return self._refuse("token_invalid_total", "token payload is not base64url JSON")
        if not isinstance(claims, dict):
            return self._refuse("token_invalid_total", "token payload is not a JSON object")
        exp: Any = claims.get("exp")
        if not _number(exp):
            why = "no 'exp' claim" if exp is None else "an 'exp' that is not a number"
            return self._refuse("token_invalid_total", f"token has {why}")
        if exp <= now:
            return self._refuse("token_expired_total", "token expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not _number(nbf) or nbf > now):
            return self._refuse("token_invalid_total", "token not valid yet (nbf)")
        channels = claims.get("channels")
        if isinstance(channels, str):
            channels = [channels]
        allowed = None
        if isinstance(channels, list):
            try:
                allowed = _patterns(",".join(channels))  # TypeError: not all of them strings
            except TypeError:
                allowed = None
        return float(exp), allowed

    def _refuse(self, counter: str, reason: str, status: int = 403) -> HttpError:
        if self.counters is not None:
            setattr(self.counters, counter, getattr(self.counters, counter) + 1)
        return HttpError(status, reason)


def _verifiers(keys: Keys) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """alg → (PyJWT algorithm object, the keys prepared for it), for the configured keys only:
    HS256's current secret first, then the older ones of a rotation."""
    from jwt.algorithms import ECAlgorithm, HMACAlgorithm, RSAAlgorithm

    out: dict[str, tuple[Any, tuple[Any, ...]]] = {}
    if keys.secrets:
        hmac = HMACAlgorithm(HMACAlgorithm.SHA256)
        out["HS256"] = (hmac, tuple(hmac.prepare_key(s) for s in keys.secrets))
    if keys.public_key is not None:
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        if isinstance(keys.public_key, rsa.RSAPublicKey):
            out["RS256"] = (RSAAlgorithm(RSAAlgorithm.SHA256), (keys.public_key,))
        elif isinstance(keys.public_key, ec.EllipticCurvePublicKey):
            out["ES256"] = (ECAlgorithm(ECAlgorithm.SHA256), (keys.public_key,))
    return out


# bytes.translate: str.translate took 2 µs of a token's ~10 µs check, twice.
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")


def _b64decode(text: str) -> bytes:
    """Strict base64url (RFC 7515: no padding; any character outside the alphabet is an error)."""
    if "+" in text or "/" in text:
        raise ValueError("not base64url")
    raw = text.encode("ascii").translate(_URL_TO_STD) + b"=" * (-len(text) % 4)
    return binascii.a2b_base64(raw, strict_mode=True)


_RAW_DECODE = json.JSONDecoder().raw_decode


def _json(text: str) -> Any:
    """``json.loads`` of a str, without its encoding sniffing and end-of-text regex: a token's
    payload is decoded once per new token on the accept path (1.5 → 0.6 µs)."""
    text = text.lstrip(" \t\n\r")  # the same str object when there is nothing to strip
    value, end = _RAW_DECODE(text)
    if end != len(text) and text[end:].strip(" \t\n\r"):
        raise ValueError("extra data after the JSON value")
    return value


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]
