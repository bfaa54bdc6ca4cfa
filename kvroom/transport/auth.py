"""Who may talk to whom on the control plane: ZMQ CURVE keys and the ZAP authenticator.

Each process has its own CURVE key pair and the public keys it accepts
(:class:`CurveKeys`).  Prefill's ROUTER is a CURVE server: every decode
connection runs the CURVE handshake, and pyzmq's
:class:`~zmq.auth.thread.ThreadAuthenticator` (the ZAP handler, one per
manager context) admits only trusted client keys.  A client that is not
trusted, that speaks plain text, or that expects another server key never
completes the handshake, so none of its frames reaches kvroom; the socket
monitor counts those refusals (:class:`HandshakeCounter`).  Decode is a CURVE
client and proves the prefill's identity by its public key.

The authenticated client key (ZAP ``User-Id``, the z85 public key) is a
decode peer's *principal* on prefill: rooms are bound to it, so a decode
process can only act on rooms its own key bound, whatever agent name or
routing identity it claims.  Without keys, the principal is the agent name
and the control plane must stay on loopback (or be opted out loudly with
``allow_unauthenticated``).

Key files are the ZeroMQ certificate format (``zmq.auth.create_certificates``):
``NAME.key`` holds the public key, ``NAME.key_secret`` both; ``kvroom keys``
writes them with 0600 permissions.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth.certs

__all__ = [
    "CurveKeys",
    "generate_keys",
    "is_loopback",
    "require_auth",
    "ServerAuth",
    "HandshakeCounter",
    "secure_client",
    "ZAP_DOMAIN",
    "AUTH_ENV",
    "auth_settings",
]

ZAP_DOMAIN = "kvroom"
HOW_TO = (
    "run `kvroom keys DIR` on each side, exchange the .key public files, and pass "
    "ManagerConfig(keys=CurveKeys.load(...)); or allow_unauthenticated=True on a trusted network"
)


def _z85(key: bytes | str, what: str) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    if not isinstance(raw, bytes) or len(raw) != 40:
        raise ValueError(f"{what} must be a 40-character z85 CURVE key, got {len(raw)} characters")
    try:
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError):
        raise ValueError(f"{what} is not a z85 CURVE key") from None
    return raw


@dataclass(frozen=True)
class CurveKeys:
    """This process's CURVE key pair and the peers' public keys it accepts (all z85).

    ``trusted``: on prefill, the decode keys it admits; on decode, the prefill
    keys it will talk to.  ``servers`` (decode, optional): the public key of the
    prefill at each bootstrap address, needed only when more than one prefill
    key is trusted.
    """

    public: bytes
    secret: bytes = field(repr=False)
    trusted: frozenset[bytes] = frozenset()
    servers: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public", _z85(self.public, "public key"))
        object.__setattr__(self, "secret", _z85(self.secret, "secret key"))
        object.__setattr__(self, "trusted", frozenset(_z85(k, "trusted key") for k in self.trusted))
        servers = {a: _z85(k, f"server key of {a}") for a, k in dict(self.servers).items()}
        object.__setattr__(self, "servers", servers)
        if not self.trusted:
            raise ValueError("CurveKeys needs at least one trusted peer key; " + HOW_TO)
        if zmq.curve_public(self.secret) != self.public:
            raise ValueError("the public key does not belong to the secret key")

    @classmethod
    def load(
        cls,
        key_file: str | os.PathLike[str],
        trusted: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        servers: Mapping[str, str | os.PathLike[str]] | None = None,
    ) -> CurveKeys:
        """Read ``NAME.key_secret`` and the trusted public keys (a directory of ``*.key``, or files).

        ``servers`` maps a bootstrap address to a prefill's ``.key`` file.
        Raises ValueError naming the file that is missing or malformed.
        """
        public, secret = _read(key_file)
        if secret is None:
            raise ValueError(f"{key_file} holds no secret key (pass the .key_secret file)")
        if isinstance(trusted, (str, os.PathLike)) and Path(trusted).is_dir():
            try:
                keys = set(zmq.auth.certs.load_certificates(trusted))
            except (OSError, ValueError) as exc:
                raise ValueError(f"cannot read trusted keys in {trusted}: {exc}") from None
            if not keys:
                raise ValueError(f"no *.key public key files in {trusted}; " + HOW_TO)
        else:
            files = [trusted] if isinstance(trusted, (str, os.PathLike)) else list(trusted)
            keys = {_read(f)[0] for f in files}
        by_address = {a: _read(f)[0] for a, f in (servers or {}).items()}
        return cls(public, secret, frozenset(keys), by_address)

    def __hash__(self) -> int:
        return hash((self.public, self.trusted, tuple(sorted(self.servers.items()))))

    def server_key(self, address: str) -> bytes:
        """Decode: the public key the prefill at ``address`` must prove (ValueError if unknown)."""
        key = self.servers.get(address)
        if key is not None:
            return key
        if len(self.trusted) == 1:
            return next(iter(self.trusted))
        raise ValueError(
            f"{len(self.trusted)} prefill keys are trusted and none is named for {address}: "
            "pass CurveKeys(servers={address: key})"
        )


def _read(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.certs.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE key file {path}: {exc}") from None


def generate_keys(directory: str | os.PathLike[str], name: str = "kvroom") -> tuple[Path, Path]:
    """Write a new key pair ``NAME.key`` / ``NAME.key_secret`` into ``directory`` (0600 files).

    Refuses (ValueError) to overwrite an existing pair.  Returns (public, secret) paths.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name must be a plain file name, got {name!r}")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if public.exists() or secret.exists():
        raise ValueError(f"{public} or {secret} exists already; choose another --name or directory")
    old = os.umask(0o177)  # created 0600: the secret is never readable by others, even briefly
    try:
        made = zmq.auth.certs.create_certificates(folder, name)
    finally:
        os.umask(old)
    for path in made:
        os.chmod(path, 0o600)
    return public, secret


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``; any other name or wildcard is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_auth(host: str, keys: CurveKeys | None, allow_unauthenticated: bool, log: Any) -> None:
    """Refuse to listen on a non-loopback ``host`` without keys (ValueError), unless opted out (logged)."""
    if keys is not None or is_loopback(host):
        return
    if not allow_unauthenticated:
        raise ValueError(
            f"refusing to listen on {host} without authentication: anyone who reaches it could read "
            f"or abort other requests' KV; {HOW_TO}"
        )
    log.warning(
        "kvroom.unauthenticated_control_plane",
        host=host,
        detail="allow_unauthenticated=True: any process that reaches this address can read KV "
        "metadata and abort rooms",
    )


class _Admit:
    """ZAP credentials provider: admit trusted client keys, count the rest."""

    def __init__(self, trusted: frozenset[bytes]) -> None:
        self.trusted = trusted
        self.unknown_keys = 0

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator thread with the client's z85 public key."""
        if key in self.trusted:
            return True
        self.unknown_keys += 1  # one writer (the authenticator thread): no lock needed
        return False


_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class HandshakeCounter:
    """Counts failed handshakes on a socket through its monitor (worker thread only).

    ``events``: which failures count (by default every kind; a client watches
    only ``EVENT_HANDSHAKE_FAILED_AUTH``, the server's refusal of its key).
    """

    def __init__(self, sock: zmq.Socket[Any], events: int = _FAILED) -> None:
        self.monitor: zmq.Socket[Any] = sock.get_monitor_socket(events)
        self.failed = 0

    def drain(self) -> int:
        """Read pending monitor events; returns how many handshakes failed since the last call."""
        from zmq.utils.monitor import recv_monitor_message

        n = 0
        while True:
            try:
                recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            n += 1
        self.failed += n
        return n

    def close(self) -> None:
        """Close the monitor socket."""
        self.monitor.close(linger=0)


class ServerAuth:
    """Prefill: CURVE server options plus the context's ZAP authenticator."""

    def __init__(self, ctx: zmq.Context[Any], keys: CurveKeys) -> None:
        from zmq.auth.thread import ThreadAuthenticator  # imports asyncio: only where keys are used

        self.keys = keys
        self.admit = _Admit(keys.trusted)
        self.authenticator = ThreadAuthenticator(ctx)
        self.authenticator.start()
        self.authenticator.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.admit)

    def secure(self, sock: zmq.Socket[Any]) -> None:
        """Make ``sock`` a CURVE server in our ZAP domain (before bind)."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        sock.zap_domain = ZAP_DOMAIN.encode()

    def close(self) -> None:
        """Stop the authenticator thread."""
        self.authenticator.stop()


def secure_client(sock: zmq.Socket[Any], keys: CurveKeys, address: str) -> None:
    """Decode: make ``sock`` a CURVE client that talks only to the prefill key of ``address``."""
    sock.curve_serverkey = keys.server_key(address)
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


AUTH_ENV = {
    "key_file": "KVROOM_KEY_FILE",
    "trusted_keys": "KVROOM_TRUSTED_KEYS",
    "allow_unauthenticated": "KVROOM_ALLOW_UNAUTHENTICATED",
}
"""The environment variables engine adapters read for :func:`auth_settings` (SGLang has no other channel)."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def auth_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``ManagerConfig`` keyword arguments (``keys``, ``allow_unauthenticated``) from plain settings.

    For engine adapters, whose configuration is strings: ``key_file`` (this
    process's ``NAME.key_secret``), ``trusted_keys`` (a directory of the peers'
    ``.key`` files, or several paths separated by ``os.pathsep``) and
    ``allow_unauthenticated`` (a bool, or "1"/"true"/"0"/"false").  Either both
    key settings or neither; ValueError names what is wrong.  Missing settings
    leave the defaults: no keys, so only a loopback control plane starts.
    """
    out: dict[str, Any] = {}
    key_file, trusted = settings.get("key_file"), settings.get("trusted_keys")
    if bool(key_file) != bool(trusted):
        raise ValueError(
            "kvroom authentication needs both key_file (this side's .key_secret) and trusted_keys "
            f"(the peers' .key files); got key_file={key_file!r}, trusted_keys={trusted!r}"
        )
    if key_file:
        paths = str(trusted).split(os.pathsep)
        out["keys"] = CurveKeys.load(str(key_file), paths[0] if len(paths) == 1 else paths)
    allow = settings.get("allow_unauthenticated")
    if allow is not None:
        text = str(allow).strip().lower()
        if isinstance(allow, bool):
            out["allow_unauthenticated"] = allow
        elif text in _TRUE | _FALSE:
            out["allow_unauthenticated"] = text in _TRUE
        else:
            raise ValueError(f"allow_unauthenticated must be true or false, got {allow!r}")
    return out
