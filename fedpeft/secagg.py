"""SecAgg+ secure aggregation (Bell et al. 2020): the protocol's cryptography and state,
independent of the transport.

One round, for clients on a k-regular communication graph:

1. **advertise** — each client makes two X25519 key pairs (``c``: share encryption,
   ``s``: mask agreement) and sends the public halves;
2. **share** — each client draws a 256-bit self-mask seed ``b`` and Shamir-splits ``b`` and
   its ``s`` secret key t-of-k among its neighbours; each neighbour's shares are sealed with
   AES-GCM under HKDF(X25519(c_i, c_j)) and routed by the server, which cannot open them;
3. **mask** — each client sends ``y = Q(w·x) + PRG(b) + Σ_j ±PRG(HKDF(X25519(s_i, s_j)))``
   mod 2^64, where ``Q`` is signed fixed point with ``frac_bits`` fractional bits and the
   last coordinate carries the weight ``w``;
4. **unmask** — the server names the survivors and the dropped; each survivor returns, per
   neighbour, the ``b`` share of a survivor or the ``s`` share of a dropped one (never
   both for one node), and the server rebuilds what it needs from any t shares.

The server learns ``Σ w·x`` and ``Σ w`` over the survivors only. Masks come from ChaCha20
keyed with the full 256-bit seed (Flower's SecAgg+ seeds numpy's RandomState with a 32-bit
fold of the key, a searchable space; that is why this module exists). Shamir sharing is
pycryptodome's over GF(2^128), on the two 16-byte halves of each 32-byte secret. Written by
hand because no maintained library implements SecAgg+ on cryptographic primitives.

Paper: Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedpeft.errors import FedPeftError

SEED_BYTES = 32
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SecAggAborted(FedPeftError):
    """The round cannot be unmasked (too few shares) or a party broke the protocol."""


# --- primitives -------------------------------------------------------------------------

def expand_mask(seed: bytes, length: int, label: bytes = b"") -> np.ndarray:
    """``length`` uint64 words of ChaCha20 keystream under the 256-bit ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"mask seeds are {SEED_BYTES} bytes, found {len(seed)}")
    nonce = (label + bytes(16))[:16]
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * length)), dtype=np.uint64).copy()


def derive_key(shared: bytes, info: bytes) -> bytes:
    """A 256-bit key from an X25519 shared secret (HKDF-SHA256)."""
    return HKDF(hashes.SHA256(), SEED_BYTES, salt=None, info=info).derive(shared)


def agree(private: X25519PrivateKey, public: bytes, info: bytes) -> bytes:
    """The key a pair of clients shares: HKDF(X25519(mine, theirs))."""
    return derive_key(private.exchange(X25519PublicKey.from_public_bytes(public)), info)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir t-of-n shares of a 32-byte secret: share i (1-based index i+1) is 32 bytes,
    one share of each 16-byte half."""
    lo = Shamir.split(threshold, holders, secret[:16])
    hi = Shamir.split(threshold, holders, secret[16:])
    return [a + b for (_, a), (_, b) in zip(lo, hi, strict=True)]


def combine_secret(shares: Mapping[int, bytes]) -> bytes:
    """The secret from ``{1-based index: share}`` (at least the threshold of them)."""
    items = sorted(shares.items())
    lo = Shamir.combine([(i, s[:16]) for i, s in items])
    hi = Shamir.combine([(i, s[16:]) for i, s in items])
    return lo + hi


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM with a random 96-bit nonce (prepended)."""
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


# --- fixed point --------------------------------------------------------------------------

def encode(vector: np.ndarray, weight: float, frac_bits: int, max_clients: int) -> np.ndarray:
    """``Q(w·x)`` then ``Q(w)`` as uint64 (two's complement); refuses values whose sum over
    ``max_clients`` could wrap."""
    scaled = np.append(np.asarray(vector, dtype=np.float64) * weight, weight)
    limit = 2.0 ** (62 - frac_bits) / max(max_clients, 1)
    if not np.all(np.isfinite(scaled)) or np.abs(scaled).max(initial=0.0) >= limit:
        raise SecAggAborted(f"update out of the fixed-point range: |w·x| must be < {limit:.3g}"
                            f" (frac_bits={frac_bits}, {max_clients} clients); found "
                            f"{np.abs(scaled).max(initial=0.0):.3g}")
    return np.round(scaled * 2.0 ** frac_bits).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, frac_bits: int) -> tuple[np.ndarray, float]:
    """(Σ w·x, Σ w) from the unmasked uint64 sum."""
    values = total.view(np.int64).astype(np.float64) / 2.0 ** frac_bits
    return values[:-1], float(values[-1])


def flatten(deltas: Mapping[str, np.ndarray]) -> np.ndarray:
    """An update as one float64 vector, tensors in sorted-name order."""
    if not deltas:
        return np.zeros(0)
    return np.concatenate([np.asarray(deltas[k], dtype=np.float64).ravel()
                           for k in sorted(deltas)])


def unflatten(flat: np.ndarray, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`flatten`, shaped and typed like ``reference``."""
    out, at = {}, 0
    for name in sorted(reference):
        ref = reference[name]
        out[name] = flat[at:at + ref.size].reshape(ref.shape).astype(ref.dtype)
        at += ref.size
    return out


# --- the communication graph ----------------------------------------------------------------

def neighbours(nodes: Iterable[int], degree: int, rng: np.random.Generator
               ) -> dict[int, list[int]]:
    """A random k-regular (Harary) graph: nodes on a randomly permuted ring, each linked to
    ``degree // 2`` on each side (complete when ``degree >= n - 1``)."""
    ids = sorted(int(n) for n in nodes)  # permute positions: node ids may exceed int64
    ring = [ids[i] for i in rng.permutation(len(ids))]
    n, half = len(ring), degree // 2
    if degree >= n - 1:
        return {a: sorted(b for b in ring if b != a) for a in ring}
    return {ring[i]: sorted({ring[(i + d) % n] for d in range(-half, half + 1) if d})
            for i in range(n)}


def check_params(num_clients: int, degree: int, threshold: int) -> None:
    """t-of-k must be able to unmask and must not let a server collect both shares."""
    k = min(degree, num_clients - 1)
    if not (k // 2 < threshold <= k):
        raise SecAggAborted(
            f"secagg threshold must be in ({k // 2}, {k}] for {num_clients} clients on a "
            f"degree-{k} graph (more than half of a node's neighbours, at most all of them); "
            f"found {threshold}")


def _info(kind: bytes, rnd: int, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return b"fedpeft-secagg/" + kind + struct.pack(">qQQ", rnd, lo, hi)


def _pair_sign(me: int, other: int) -> int:
    return 1 if me < other else -1


# --- client -----------------------------------------------------------------------------------

@dataclass
class ClientRound:
    """One client's secrets for one round (kept by the client between stages)."""

    node: int
    rnd: int
    c_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    s_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES))
    peers: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    inbox: dict[int, bytes] = field(default_factory=dict)

    def dump(self) -> dict[str, bytes | int | list[bytes] | list[str]]:
        """Plain values to keep between stages (in the node's own state, never sent)."""
        raw = (serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
               serialization.NoEncryption())
        return {"node": str(self.node), "round": self.rnd, "seed": self.seed,
                "c": self.c_key.private_bytes(*raw), "s": self.s_key.private_bytes(*raw),
                "peers": [str(j) for j in self.peers],
                "peer_keys": [c + s for c, s in self.peers.values()],
                "inbox_from": [str(j) for j in self.inbox], "inbox": list(self.inbox.values())}

    @classmethod
    def load(cls, data: Mapping) -> ClientRound:
        """The inverse of :meth:`dump`."""
        peers = {int(j): (k[:32], k[32:]) for j, k in zip(data["peers"], data["peer_keys"],
                                                           strict=True)}
        inbox = dict(zip(map(int, data["inbox_from"]), data["inbox"], strict=True))
        return cls(int(data["node"]), int(data["round"]),
                   X25519PrivateKey.from_private_bytes(data["c"]),
                   X25519PrivateKey.from_private_bytes(data["s"]), bytes(data["seed"]),
                   peers, inbox)

    def advertise(self) -> tuple[bytes, bytes]:
        """Stage 1: the two public keys (c, s)."""
        return public_bytes(self.c_key), public_bytes(self.s_key)

    def share(self, peers: Mapping[int, tuple[bytes, bytes]], threshold: int
              ) -> dict[int, bytes]:
        """Stage 2: sealed ``(b share, s share)`` for each neighbour in ``peers``."""
        self.peers = dict(sorted(peers.items()))
        if self.node in self.peers:
            raise SecAggAborted(f"node {self.node} was listed as its own neighbour")
        order = list(self.peers)
        if len(order) < threshold:
            raise SecAggAborted(f"node {self.node}: {len(order)} neighbour(s) advertised keys, "
                                f"fewer than the threshold {threshold}; the round cannot go on")
        b_shares = split_secret(self.seed, threshold, len(order))
        s_shares = split_secret(self._s_secret(), threshold, len(order))
        return {j: seal(self._box(j), bytes([i + 1]) + b_shares[i] + s_shares[i],
                        _info(b"share", self.rnd, self.node, j))
                for i, j in enumerate(order)}

    def _s_secret(self) -> bytes:
        return self.s_key.private_bytes(serialization.Encoding.Raw,
                                        serialization.PrivateFormat.Raw,
                                        serialization.NoEncryption())

    def _box(self, j: int) -> bytes:
        return agree(self.c_key, self.peers[j][0], _info(b"box", self.rnd, self.node, j))

    def mask(self, encoded: np.ndarray, inbox: Mapping[int, bytes]) -> np.ndarray:
        """Stage 3: keep the sealed shares addressed to me; return the masked vector with
        pairwise masks for the neighbours that shared (their shares reached me)."""
        self.inbox = {j: ct for j, ct in inbox.items() if j in self.peers}
        out = encoded + expand_mask(self.seed, encoded.size)
        for j in self.inbox:
            s_pub = self.peers[j][1]
            pad = expand_mask(agree(self.s_key, s_pub, _info(b"mask", self.rnd, self.node, j)),
                              encoded.size)
            out = out + pad if _pair_sign(self.node, j) > 0 else out - pad
        return out

    def reveal(self, survivors: Iterable[int], dropped: Iterable[int]
               ) -> dict[int, tuple[str, int, bytes]]:
        """Stage 4: per neighbour, ``("b", index, share)`` for a survivor or ``("s", index,
        share)`` for a dropped one. Refuses a node listed as both (with t > k/2 that is
        what keeps a lying server from collecting both secrets of one node)."""
        alive, gone = set(survivors), set(dropped)
        if alive & gone:
            raise SecAggAborted(f"node {self.node}: inconsistent unmask request (survivors "
                                f"{sorted(alive)}, dropped {sorted(gone)})")
        out = {}
        for j in sorted((alive | gone) & set(self.inbox)):
            plain = unseal(self._box(j), self.inbox[j], _info(b"share", self.rnd, j, self.node))
            kind = "b" if j in alive else "s"
            out[j] = (kind, plain[0], plain[1:33] if kind == "b" else plain[33:65])
        return out


# --- server -----------------------------------------------------------------------------------

@dataclass
class ServerRound:
    """The server's side of one round: the graph, the routing and the unmasking."""

    rnd: int
    threshold: int
    graph: dict[int, list[int]]
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)

    def peers_of(self, node: int) -> dict[int, tuple[bytes, bytes]]:
        """The public keys of ``node``'s neighbours that advertised."""
        return {j: self.keys[j] for j in self.graph[node] if j in self.keys}

    def route(self, sealed: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 2→3: ``{sender: {receiver: ct}}`` to ``{receiver: {sender: ct}}``."""
        self.shared = set(sealed)
        inbox: dict[int, dict[int, bytes]] = {}
        for src, per_dst in sealed.items():
            for dst, ct in per_dst.items():
                inbox.setdefault(dst, {})[src] = ct
        return inbox

    def unmask_plan(self, masked: Mapping[int, np.ndarray]) -> tuple[list[int], list[int]]:
        """Survivors (shared, then sent a masked vector) and dropped (shared keys, sent
        nothing)."""
        return sorted(self.shared & set(masked)), sorted(self.shared - set(masked))

    def aggregate(self, masked: Mapping[int, np.ndarray],
                  reveals: Mapping[int, Mapping[int, tuple[str, int, bytes]]]) -> np.ndarray:
        """Σ of the survivors' encoded vectors (uint64), all masks removed."""
        alive, gone = self.unmask_plan(masked)
        if not alive:
            raise SecAggAborted("no client sent a masked update")
        total = np.sum(np.stack([masked[i] for i in alive]), axis=0, dtype=np.uint64)
        size = total.size
        for i in alive:
            total = total - expand_mask(self._rebuild(i, "b", reveals), size)
        for j in gone:
            total = self._remove_pairs(total, j, self._rebuild(j, "s", reveals), alive)
        return total

    def _rebuild(self, node: int, kind: str, reveals: Mapping[int, Mapping]) -> bytes:
        shares = {idx: share for rev in reveals.values() if node in rev
                  for k, idx, share in [rev[node]] if k == kind}
        if len(shares) < self.threshold:
            raise SecAggAborted(
                f"round {self.rnd}: {len(shares)} share(s) of node {node}'s "
                f"{'self-mask seed' if kind == 'b' else 'mask key'} arrived, "
                f"{self.threshold} needed; too many clients dropped to unmask")
        return combine_secret(dict(sorted(shares.items())[: self.threshold]))

    def _remove_pairs(self, total: np.ndarray, j: int, s_secret: bytes, alive: list[int]
                      ) -> np.ndarray:
        s_key = X25519PrivateKey.from_private_bytes(s_secret)
        if public_bytes(s_key) != self.keys[j][1]:
            raise SecAggAborted(f"node {j}'s rebuilt mask key does not match its public key")
        for i in sorted(set(self.graph[j]) & set(alive)):
            pad = expand_mask(agree(s_key, self.keys[i][1], _info(b"mask", self.rnd, i, j)),
                              total.size)
            total = total - pad if _pair_sign(i, j) > 0 else total + pad
        return total


# --- one round in one process (tests, benchmarks) --------------------------------------------

@dataclass(frozen=True)
class SecAggParams:
    """Graph degree k, threshold t (t-of-k), fixed-point fractional bits."""

    degree: int
    threshold: int
    frac_bits: int = 24


def local_round(updates: Mapping[int, tuple[np.ndarray, float]], params: SecAggParams,
                rnd: int = 1, drop_after_share: Iterable[int] = (),
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, float]:
    """Every stage of one round between in-process parties; clients in
    ``drop_after_share`` vanish after stage 2. Returns (Σ w·x, Σ w) of the survivors."""
    check_params(len(updates), params.degree, params.threshold)
    rng = rng or np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    server = ServerRound(rnd, params.threshold, neighbours(updates, params.degree, rng))
    clients = {i: ClientRound(i, rnd) for i in updates}
    server.keys = {i: c.advertise() for i, c in clients.items()}
    inbox = server.route({i: c.share(server.peers_of(i), params.threshold)
                          for i, c in clients.items()})
    gone = set(drop_after_share)
    masked = {i: c.mask(encode(*updates[i], params.frac_bits, len(updates)), inbox.get(i, {}))
              for i, c in clients.items() if i not in gone}
    alive, dropped = server.unmask_plan(masked)
    reveals = {i: clients[i].reveal(alive, dropped) for i in alive}
    return decode(server.aggregate(masked, reveals), params.frac_bits)
