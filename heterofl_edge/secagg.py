"""Secure aggregation for nested sub-models: SecAgg+ (Bell et al., CCS 2020) over mixed widths.

The coordinator learns the per-element sums of the clients' vectors and
nothing of any one client's. Each client's vector is its own slice of the
model, flattened in a canonical order (tensor by tensor in the spec's order,
row-major within the slice); HeteroFL's slices are nested, so two clients'
vectors intersect in the smaller one's whole slice. A pairwise mask between
u and v is drawn over that intersection, added by one and subtracted by the
other, and cancels in the sum of every element both hold; elements outside
the intersection are never touched by that pair. Everything here is modular
arithmetic in Z_{2^32} on uint32 arrays (numpy wraps), so the sums are exact.

Numbers become ring elements by fixed point (``FixedPoint``: values clipped to
``[-clip, clip]``, times a power-of-two ``scale`` chosen so that the sum of
every participant cannot wrap), by shared int8 (``SharedInt8``: steps of
``clip / 127`` rounded stochastically, for int8 uploads; their sums, and so the
masks, live in the smaller ring Z_{2^(8 + ceil(log2 n))}, which 2^32 is a
multiple of: the arithmetic stays in uint32 and only the upload is reduced),
or, where 32 bits are too few (sBN sums), by ``encode_wide``: an int64 split
into four 16-bit digits, each summed in its own 32-bit element (no carry is
lost for fewer than 2^16 clients).

One aggregation is an *instance* named by a ``context`` string (run, round,
phase): fresh keys, fresh masks. Its stages (Bell et al., Figure 2, honest but
curious server; our ``SecAggServer`` and ``SecAggClient``):

1. **advertise**: each client makes two P-256 key pairs, ``c`` (share
   encryption) and ``s`` (pairwise masks), and sends both public keys;
2. **share**: the server draws a random neighbour graph of O(log n) degree
   (``neighbour_graph``) and sends each client its neighbours' keys; the
   client Shamir-shares (threshold t) its ``s`` secret key and a fresh
   self-mask seed among them, each neighbour's pair of shares encrypted with
   AES-GCM under an HKDF key of their ``c`` agreement, routed by the server;
3. **masked input**: each client adds to its vector the self mask PRG(b_u)
   and, per neighbour v that shared keys, ``+PRG(s_uv)`` if u < v else
   ``-PRG(s_uv)`` over their intersection (``embedding``), and uploads it;
4. **unmask**: survivors send, for each neighbour that dropped after sharing,
   its share of that neighbour's ``s`` key (the server recomputes the
   dropped client's pairwise masks with the survivors) and, for each
   surviving neighbour, its share of that neighbour's self-mask seed (never
   both for one client). With t shares of each the server removes every mask.

Below the threshold at any stage the instance fails (``BelowThreshold``) and
nothing more is asked of the clients.

Primitives: ECDH P-256, HKDF-SHA256, AES-256-GCM and AES-256-CTR from
``cryptography``; ``web/secagg.js`` is the same client on WebCrypto, byte for
byte (``tests/vectors/secagg.json``).
Shamir's scheme is over the prime field of p = 2^521 - 1 (a Mersenne prime
above every 32-byte secret), written here (a few lines of modular arithmetic;
no maintained Python and JavaScript pair of libraries shares a format).
No torch: devices install this.
"""

from __future__ import annotations

import base64
import functools
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from heterofl_edge.batching import SplitMix64
from heterofl_edge.errors import HeteroFLError

__all__ = [
    "MODULUS_BITS",
    "PRIME",
    "SHARE_BYTES",
    "WIDE_DIGITS",
    "Advertisement",
    "BelowThreshold",
    "FixedPoint",
    "LayoutPlan",
    "Quantizer",
    "SecAggClient",
    "SecAggRefusal",
    "SecAggServer",
    "Segment",
    "SharedInt8",
    "Stage",
    "VectorLayout",
    "b64",
    "combine_shares",
    "decode_wide",
    "degree_for",
    "derive_key",
    "embedding",
    "encode_wide",
    "fixed_point_for",
    "from_b64",
    "neighbour_graph",
    "prg",
    "reduce_masked",
    "shared_int8_for",
    "signed_sums",
    "split_secret",
    "statistics_layout",
    "statistics_vector",
    "threshold_for",
    "training_vector",
    "unb64",
    "wire_dtype",
]

MODULUS_BITS = 32  # masked elements live in Z_{2^32} (int8 uploads: a smaller power of two)
INT8_STEPS = 127  # SharedInt8: q in [-127, 127]
PRIME = 2**521 - 1  # Shamir's field (a Mersenne prime)
SHARE_BYTES = 66  # a field element, big-endian
WIDE_DIGITS = 4  # encode_wide: an int64 as four 16-bit digits
SALT = b"heterofl-edge secure aggregation v1"


class Stage(StrEnum):
    """The stages of one secure aggregation instance, in order."""

    advertise = "advertise"
    share = "share"
    masked = "masked"  # the training or statistics upload itself
    unmask = "unmask"


class SecAggRefusal(HeteroFLError):
    """A client's message that does not fit the protocol; ``code`` names the fault.

    ``duplicate_advertisement``, ``replayed_key``, ``bad_key``, ``unknown_peer``,
    ``bad_share``, ``wrong_length``, ``bad_modulus``, ``duplicate_unmask``,
    ``not_a_participant``.
    """

    code = "bad_secagg"


class BelowThreshold(HeteroFLError):
    """Too few clients are left for the instance to go on: the round is abandoned."""

    code = "below_threshold"


# -- encodings -----------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str = "value") -> bytes:
    """Bytes of standard base64 ``text``; ``SecAggRefusal`` (``bad_share``) otherwise."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise SecAggRefusal(f"{what} is not base64", code="bad_share") from None


from_b64 = unb64


@dataclass(frozen=True)
class FixedPoint:
    """Values in ``[-clip, clip]`` as ``round(x * scale)`` in Z_{2^32} (two's complement).

    ``scale`` is a power of two with ``clients * clip * scale < 2^31``: the sum
    of that many encoded values, read back as a signed 32-bit integer, is exact.
    Each value is off by at most ``0.5 / scale`` after rounding, so an average
    over any number of them is too.
    """

    scale: float
    clip: float
    modulus_bits: ClassVar[int] = MODULUS_BITS

    def encode(self, values: np.ndarray, rng: SplitMix64 | None = None) -> np.ndarray:
        """Each value clipped and rounded to nearest (``rng`` unused: no draws)."""
        clipped = np.clip(np.asarray(values, np.float64), -self.clip, self.clip)
        return np.rint(clipped * self.scale).astype(np.int64).astype(np.uint32)

    def decode_sum(self, sums: np.ndarray) -> np.ndarray:
        """The real sum behind a sum of encoded values (float64)."""
        return np.asarray(sums, np.uint32).view(np.int32).astype(np.float64) / self.scale

    @property
    def resolution(self) -> float:
        """The largest rounding error of one value, and of an average of them."""
        return 0.5 / self.scale


def fixed_point_for(clients: int, clip: float) -> FixedPoint:
    """The finest power-of-two scale at which ``clients`` values within ``clip`` cannot wrap."""
    if clients < 1 or not (clip > 0 and math.isfinite(clip)):
        raise HeteroFLError(f"no fixed point for {clients} clients at clip {clip}")
    exponent = math.floor(math.log2((2**31 - 1) / (clients * clip)))
    while clients * clip * 2.0**exponent >= 2**31 - 1:  # log2's rounding at an exact power
        exponent -= 1
    return FixedPoint(2.0**exponent, clip)


@dataclass(frozen=True)
class SharedInt8:
    """int8 uploads under secure aggregation: the quantized integers are what is masked.

    Every client of an instance shares one step, ``clip / 127`` (public: it is in
    the task), so the integers of the clients holding an element sum to that
    element's sum in steps. A value is clipped to ``[-clip, clip]`` and rounded
    stochastically and without bias, ``q = floor(x / step + u)`` with ``u`` uniform
    in [0, 1) (``heterofl_edge.encoding``'s draws: SplitMix64 from the upload's
    rounding seed, one draw per element in the vector's order), so ``q`` lies in
    [-127, 127]. The sum of ``n`` clients' integers lies within ``±127 n``, below
    ``2^(modulus_bits - 1)`` for ``modulus_bits = 8 + ceil(log2 n)``: the masks
    and the sums live in Z_{2^modulus_bits}, and an upload of at most 16 bits
    travels as uint16 (half of the fixed point's uint32).
    """

    clip: float
    modulus_bits: int

    @property
    def step(self) -> float:
        return self.clip / INT8_STEPS

    def encode(self, values: np.ndarray, rng: SplitMix64 | None = None) -> np.ndarray:
        if rng is None:
            raise HeteroFLError("int8 secure uploads round stochastically: give the rounding rng")
        flat = np.clip(np.asarray(values, np.float64).reshape(-1), -self.clip, self.clip)
        drawn = np.floor(flat / self.step + rng.uniforms(flat.size))
        q = np.clip(drawn, -INT8_STEPS, INT8_STEPS).astype(np.int64)
        return q.astype(np.uint32)  # two's complement: reduced mod 2^bits on the wire

    def decode_sum(self, sums: np.ndarray) -> np.ndarray:
        """The real sum behind a sum of encoded values (float64)."""
        return signed_sums(sums, self.modulus_bits).astype(np.float64) * self.step

    @property
    def resolution(self) -> float:
        """The largest rounding error of one value, and of an average of them (one step)."""
        return self.step


def shared_int8_for(clients: int, clip: float) -> SharedInt8:
    """int8 for ``clients`` clients: ``8 + ceil(log2 clients)`` bits hold their sum."""
    if clients < 1 or not (clip > 0 and math.isfinite(clip)):
        raise HeteroFLError(f"no int8 encoding for {clients} clients at clip {clip}")
    bits = 8 + math.ceil(math.log2(clients))
    if bits > MODULUS_BITS:
        raise HeteroFLError(f"{clients} clients' int8 sums need {bits} bits, more than 32")
    return SharedInt8(clip, bits)


Quantizer = FixedPoint | SharedInt8


def signed_sums(sums: np.ndarray, bits: int) -> np.ndarray:
    """Sums in Z_{2^bits} (uint32) as signed integers (int64), two's complement."""
    low = np.asarray(sums, np.uint32).astype(np.int64) & ((1 << bits) - 1)
    return np.where(low >= 1 << (bits - 1), low - (1 << bits), low)


def wire_dtype(bits: int) -> type[np.unsignedinteger[Any]]:
    """The array type a masked vector of ``bits``-bit elements travels in."""
    return np.uint16 if bits <= 16 else np.uint32


def reduce_masked(vector: np.ndarray, bits: int) -> np.ndarray:
    """A masked uint32 vector in Z_{2^bits}, as ``wire_dtype(bits)`` (the upload)."""
    values = np.asarray(vector, np.uint32)
    if bits >= MODULUS_BITS:
        return values
    return (values & np.uint32((1 << bits) - 1)).astype(wire_dtype(bits))


def encode_wide(values: np.ndarray, scale: float) -> np.ndarray:
    """``round(v * scale)`` as int64, as four 16-bit digits per value (uint32, low first).

    Fewer than 2^16 clients' digits sum without wrapping in 32 bits, so the sum
    of the int64s (mod 2^64) comes back exactly (``decode_wide``).
    """
    scaled = np.rint(np.asarray(values, np.float64) * scale)
    if not np.all(np.abs(scaled) < 2.0**62):
        raise HeteroFLError("a value is too large for the wide fixed point")
    as_unsigned = scaled.astype(np.int64).view(np.uint64)
    digits = np.stack([(as_unsigned >> np.uint64(16 * k)) & np.uint64(0xFFFF) for k in range(4)])
    return digits.T.reshape(-1).astype(np.uint32)


def decode_wide(sums: np.ndarray, scale: float) -> np.ndarray:
    """The real sums behind summed ``encode_wide`` digits (float64)."""
    digits = np.asarray(sums, np.uint32).astype(np.uint64).reshape(-1, WIDE_DIGITS)
    total = np.zeros(len(digits), np.uint64)
    for k in range(WIDE_DIGITS):
        total += digits[:, k] << np.uint64(16 * k)  # uint64 arithmetic wraps: mod 2^64
    return total.view(np.int64).astype(np.float64) / scale


# -- primitives ------------------------------------------------------------------------


def derive_key(secret: bytes, purpose: str, context: str) -> bytes:
    """A 32-byte key for ``purpose`` in instance ``context`` (HKDF-SHA256, fixed salt)."""
    info = f"{purpose}|{context}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=SALT, info=info).derive(secret)


_PRG_CHUNK = 1 << 16  # bytes of keystream per call: the zeros stay in cache
_ZEROS = bytes(_PRG_CHUNK)


def prg(key: bytes, count: int) -> np.ndarray:
    """``count`` uniform uint32s: AES-256-CTR keystream from a zero counter, little-endian words.

    The counter block is 16 bytes, big-endian, starting at zero (WebCrypto's
    AES-CTR with ``length: 64`` gives the same stream below 2^64 blocks).
    """
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    # The keystream is written into the array itself, a chunk of zeros at a time (no copies);
    # update_into asks for a block's slack beyond each chunk, hence the extra words.
    words = np.empty(count + 4, dtype="<u4")
    out = words.data.cast("B")
    total = 4 * count
    for start in range(0, total, _PRG_CHUNK):
        size = min(_PRG_CHUNK, total - start)
        encryptor.update_into(_ZEROS[:size], out[start : start + size + 16])
    encryptor.finalize()
    return words[:count].astype(np.uint32, copy=False)


def _public_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def load_public(data: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from its 65-byte uncompressed point; ``bad_key`` otherwise."""
    if len(data) != 65:
        raise SecAggRefusal("a public key is a 65-byte uncompressed P-256 point", code="bad_key")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError:
        raise SecAggRefusal("a public key is not a point of P-256", code="bad_key") from None


def agree(private: ec.EllipticCurvePrivateKey, public: bytes) -> bytes:
    """The ECDH shared secret (the x coordinate, 32 bytes) with ``public``."""
    return private.exchange(ec.ECDH(), load_public(public))


def split_secret(
    secret: int, holders: Sequence[int], threshold: int, random: Callable[[int], bytes]
) -> dict[int, int]:
    """Shamir shares of ``secret`` (< PRIME) at the points ``holders`` (distinct, >= 1).

    Any ``threshold`` of them give the secret back (``combine_shares``), fewer
    tell nothing. Coefficients are drawn from ``random`` (80 bytes each,
    reduced: a bias below 2^-119).
    """
    if not 0 <= secret < PRIME:
        raise HeteroFLError("a Shamir secret must lie in the field")
    if not 1 <= threshold <= len(holders) or len(set(holders)) != len(holders):
        raise HeteroFLError(f"cannot share among {len(holders)} holders at threshold {threshold}")
    if any(not 1 <= x < PRIME for x in holders):
        raise HeteroFLError("Shamir points must be positive")
    coefficients = [secret] + [
        int.from_bytes(random(80), "big") % PRIME for _ in range(threshold - 1)
    ]
    shares = {}
    for x in holders:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def combine_shares(shares: Mapping[int, int]) -> int:
    """The secret behind ``shares`` (point -> value), by Lagrange interpolation at 0."""
    points = list(shares)
    secret = 0
    for i in points:
        numerator, denominator = 1, 1
        for j in points:
            if j != i:
                numerator = numerator * (-j) % PRIME
                denominator = denominator * (i - j) % PRIME
        secret = (secret + shares[i] * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


def _share_aad(context: str, sender: int, receiver: int) -> bytes:
    return f"secagg share|{context}|{sender}|{receiver}".encode()


def encrypt_shares(
    key: bytes,
    context: str,
    sender: int,
    receiver: int,
    sk_share: int,
    b_share: int,
    random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """The sender's two shares for the receiver: a nonce, then their AES-256-GCM ciphertext.

    The 12-byte nonce comes from ``random``; the plaintext is both shares,
    big-endian, 66 bytes each.
    """
    nonce = random(12)
    plain = sk_share.to_bytes(SHARE_BYTES, "big") + b_share.to_bytes(SHARE_BYTES, "big")
    return nonce + AESGCM(key).encrypt(nonce, plain, _share_aad(context, sender, receiver))


def decrypt_shares(
    key: bytes, context: str, sender: int, receiver: int, blob: bytes
) -> tuple[int, int]:
    """``(sk_share, b_share)`` from ``encrypt_shares``' bytes; ``bad_share`` if they fail."""
    try:
        plain = AESGCM(key).decrypt(blob[:12], blob[12:], _share_aad(context, sender, receiver))
    except (InvalidTag, ValueError):
        raise SecAggRefusal(
            f"the shares from client {sender} do not decrypt", code="bad_share"
        ) from None
    if len(plain) != 2 * SHARE_BYTES:
        raise SecAggRefusal(f"the shares from client {sender} are malformed", code="bad_share")
    return int.from_bytes(plain[:SHARE_BYTES], "big"), int.from_bytes(plain[SHARE_BYTES:], "big")


# -- the neighbour graph ---------------------------------------------------------------


def degree_for(clients: int) -> int:
    """Neighbours per client: ``2 ceil(1.5 log2 n)``, or everyone when that is as many.

    O(log n), as SecAgg+ needs; 10 clients: all 9 others, 50: 18, 100: 20, 1000: 30.
    """
    if clients <= 1:
        return 0
    return min(clients - 1, 2 * math.ceil(1.5 * math.log2(clients)))


def threshold_for(degree: int, fraction: float) -> int:
    """Shares needed to rebuild a client's secrets: ``ceil(fraction * degree)``, at least 1."""
    return max(1, min(degree, math.ceil(round(fraction * degree, 9))))


def neighbour_graph(indices: Sequence[int], degree: int, seed: int) -> dict[int, set[int]]:
    """A random ``degree``-regular graph on ``indices`` (a Harary graph, relabelled at random).

    The clients sit on a ring in an order drawn from ``seed``; each is joined to
    the ``degree / 2`` nearest on either side (the complete graph when
    ``degree >= n - 1``). Symmetric, no self-loops.
    """
    n = len(indices)
    if degree >= n - 1:
        return {i: set(indices) - {i} for i in indices}
    order = np.random.default_rng([seed, 0x5EC]).permutation(np.asarray(indices)).tolist()
    half = max(1, degree // 2)
    graph: dict[int, set[int]] = {i: set() for i in indices}
    for at, node in enumerate(order):
        for step in range(1, half + 1):
            other = order[(at + step) % n]
            graph[node].add(other)
            graph[other].add(node)
    return graph


# -- vector layouts --------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One tensor's slice in a client's vector: its name, shape, and blocks per dimension.

    ``blocks[d]``: 0 for a dimension every width holds whole (fixed, labels), 1
    for a width dimension (its first entries), h for a per-head dimension (h
    equal blocks, each sliced to its first entries).
    """

    name: str
    shape: tuple[int, ...]
    blocks: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class VectorLayout:
    """A client's vector: its tensor segments in order, then ``presence`` count entries."""

    segments: tuple[Segment, ...]
    presence: int = 0
    offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    tensor_size: int = field(init=False, repr=False, compare=False)  # the segments' elements
    size: int = field(init=False, repr=False, compare=False)  # the vector's elements

    def __post_init__(self) -> None:
        # Computed once: masking asks every peer's layout for its size.
        starts, at = [], 0
        for segment in self.segments:
            starts.append(at)
            at += segment.size
        object.__setattr__(self, "offsets", tuple(starts))
        object.__setattr__(self, "tensor_size", at)
        object.__setattr__(self, "size", at + self.presence)


def _dim_map(small: int, large: int, blocks: int) -> np.ndarray:
    """Where each index of a dimension of length ``small`` sits in one of length ``large``."""
    index = np.arange(small, dtype=np.int64)
    if blocks == 0:
        if small != large:
            raise HeteroFLError(f"a fixed dimension differs between slices ({small}, {large})")
        return index
    if small % blocks or large % blocks or small > large:
        raise HeteroFLError(f"slices of {small} and {large} in {blocks} blocks do not nest")
    per_small, per_large = small // blocks, large // blocks
    return (index // per_small) * per_large + index % per_small


@functools.lru_cache(maxsize=64)
def embedding(small: VectorLayout, large: VectorLayout) -> np.ndarray:
    """Each element of a ``small`` vector's position in a ``large`` one (nested slices).

    Positions compose: embedding(a, c) == embedding(b, c)[embedding(a, b)]. The
    array is read-only and cached (a round has a few layouts, used by every client).
    """
    if [s.name for s in small.segments] != [s.name for s in large.segments] or (
        small.presence > large.presence
    ):
        raise HeteroFLError("the two layouts do not nest")
    parts = []
    for a, b, start in zip(small.segments, large.segments, large.offsets, strict=True):
        if len(a.shape) != len(b.shape) or a.blocks != b.blocks:
            raise HeteroFLError(f"{a.name}: the two slices do not nest")
        strides = [math.prod(b.shape[d + 1 :]) for d in range(len(b.shape))]
        flat = np.zeros((), np.int64)
        for d in range(len(a.shape)):
            flat = np.add.outer(flat, _dim_map(a.shape[d], b.shape[d], a.blocks[d]) * strides[d])
        parts.append(flat.reshape(-1) + start)
    parts.append(np.arange(small.presence, dtype=np.int64) + large.tensor_size)
    positions = np.concatenate(parts)
    positions.flags.writeable = False
    return positions


def _add_at(
    target: np.ndarray, values: np.ndarray, positions: np.ndarray | None, subtract: bool
) -> None:
    """``target[positions] += values`` (or ``-=``) in Z_{2^32}; all of ``target`` if None."""
    operation = np.subtract if subtract else np.add  # uint32 arithmetic wraps: mod 2^32
    if positions is None:
        operation(target, values, out=target)
    else:  # positions are distinct: no collisions to accumulate
        target[positions] = operation(target[positions], values)


# -- the client -----------------------------------------------------------------------


@dataclass(frozen=True)
class Advertisement:
    """A client's two public keys (65-byte uncompressed P-256 points)."""

    c_public: bytes  # share encryption
    s_public: bytes  # pairwise masks


def check_advertisement(advertisement: Advertisement) -> None:
    """``SecAggRefusal`` (``bad_key``) unless both keys are P-256 points and differ."""
    load_public(advertisement.c_public)
    load_public(advertisement.s_public)
    if advertisement.c_public == advertisement.s_public:
        raise SecAggRefusal("the two public keys must differ", code="bad_key")


class SecAggClient:
    """One client's side of one instance: its keys, its self-mask seed, the shares it holds.

    ``advertise`` -> ``share_keys`` -> ``mask`` -> ``unmask``, each at most once
    and in order (``SecAggRefusal`` otherwise: a client never answers an unmask
    request twice, nor reveals both kinds of share for one neighbour).
    """

    def __init__(
        self,
        context: str,
        index: int,
        random: Callable[[int], bytes] = secrets.token_bytes,
        keys: tuple[int, int] | None = None,
    ) -> None:
        """A client with fresh keys and a fresh self-mask seed.

        ``random`` draws the seed, Shamir's coefficients and the nonces; ``keys``
        (the ``c`` and ``s`` private scalars) and a deterministic ``random`` make a
        reproducible client (the vectors shared with the browser's tests).
        """
        self.context = context
        self.index = index
        self._random = random
        if keys is None:
            self._c_key = ec.generate_private_key(ec.SECP256R1())
            self._s_key = ec.generate_private_key(ec.SECP256R1())
        else:
            self._c_key = ec.derive_private_key(keys[0], ec.SECP256R1())
            self._s_key = ec.derive_private_key(keys[1], ec.SECP256R1())
        self._seed = random(32)
        self._neighbours: dict[int, Advertisement] = {}
        self._masked_with: set[int] | None = None
        self._ciphertexts: dict[int, bytes] = {}
        self._share_keys: dict[int, bytes] = {}
        self._unmasked = False
        self.threshold = 0

    def advertise(self) -> Advertisement:
        return Advertisement(_public_bytes(self._c_key), _public_bytes(self._s_key))

    def share_keys(
        self, neighbours: Mapping[int, Advertisement], threshold: int
    ) -> dict[int, bytes]:
        """Encrypted shares of this client's secrets for each neighbour (index -> bytes)."""
        if self._neighbours:
            raise SecAggRefusal("keys were shared already in this instance", code="bad_share")
        if self.index in neighbours or not 1 <= threshold <= len(neighbours):
            raise SecAggRefusal(
                f"cannot share among {len(neighbours)} neighbours at threshold {threshold}",
                code="bad_share",
            )
        for advertisement in neighbours.values():
            check_advertisement(advertisement)
        holders = sorted(neighbours)
        sk = self._s_key.private_numbers().private_value
        sk_shares = split_secret(sk, holders, threshold, self._random)
        b_shares = split_secret(int.from_bytes(self._seed, "big"), holders, threshold, self._random)
        out = {}
        for v in holders:
            key = derive_key(agree(self._c_key, neighbours[v].c_public), "shares", self.context)
            self._share_keys[v] = key  # the same key decrypts v's shares for this client
            out[v] = encrypt_shares(
                key, self.context, self.index, v, sk_shares[v], b_shares[v], self._random
            )
        self._neighbours = dict(neighbours)
        self.threshold = threshold
        return out

    def mask(
        self,
        vector: np.ndarray,
        layout: VectorLayout,
        peers: Mapping[int, VectorLayout],
        ciphertexts: Mapping[int, bytes],
        modulus_bits: int = MODULUS_BITS,
    ) -> np.ndarray:
        """``vector`` (uint32, this client's layout) with its self mask and pairwise masks.

        ``peers`` are the neighbours that shared keys (and their layouts);
        ``ciphertexts`` the shares they sent this client, kept for ``unmask``. The
        result is in Z_{2^modulus_bits}, as ``wire_dtype(modulus_bits)`` (the upload).
        """
        if self._masked_with is not None:
            raise SecAggRefusal("this client masked its input already", code="bad_share")
        unknown = (set(peers) | set(ciphertexts)) - set(self._neighbours)
        if unknown:
            raise SecAggRefusal(
                f"clients {sorted(unknown)} are not neighbours", code="unknown_peer"
            )
        values = np.asarray(vector, np.uint32)
        if values.shape != (layout.size,):
            raise SecAggRefusal(
                f"the vector has {values.size} elements, the layout {layout.size}",
                code="wrong_length",
            )
        out = values.copy()
        out += prg(derive_key(self._seed, "self mask", self.context), layout.size)
        for v in sorted(peers):
            other = peers[v]
            seed = derive_key(
                agree(self._s_key, self._neighbours[v].s_public), "pair mask", self.context
            )
            if other.size <= layout.size:
                positions = None if other.size == layout.size else embedding(other, layout)
                mask = prg(seed, other.size)
            else:
                embedding(layout, other)  # checks that they nest
                positions, mask = None, prg(seed, layout.size)
            _add_at(out, mask, positions, subtract=self.index > v)
        self._masked_with = set(peers)
        self._ciphertexts = dict(ciphertexts)
        return reduce_masked(out, modulus_bits)

    def unmask(self, dropped: Iterable[int], survivors: Iterable[int]) -> dict[int, int]:
        """Shares for the server: ``s``-key shares of ``dropped``, seed shares of ``survivors``.

        Index -> share value. Refused: a second request, a client in both lists,
        or one that is not a neighbour whose shares this client holds.
        """
        dropped, survivors = set(dropped), set(survivors)
        if self._unmasked:
            raise SecAggRefusal(
                "this client answered the unmask request already", code="duplicate_unmask"
            )
        if self._masked_with is None:
            raise SecAggRefusal("this client has not masked an input", code="bad_share")
        if dropped & survivors:
            raise SecAggRefusal(
                f"clients {sorted(dropped & survivors)} are listed as dropped and surviving",
                code="bad_share",
            )
        unknown = (dropped | survivors) - set(self._ciphertexts)
        if unknown:
            raise SecAggRefusal(f"no shares of clients {sorted(unknown)}", code="unknown_peer")
        self._unmasked = True
        out = {}
        for v in sorted(dropped | survivors):
            sk_share, b_share = decrypt_shares(
                self._share_keys[v], self.context, v, self.index, self._ciphertexts[v]
            )
            out[v] = sk_share if v in dropped else b_share
        return out


# -- the server -----------------------------------------------------------------------


@dataclass(frozen=True)
class ShareRequest:
    """What a client needs to share its keys: its neighbours' keys and the threshold."""

    neighbours: dict[int, Advertisement]
    threshold: int


@dataclass(frozen=True)
class MaskRequest:
    """What a client needs to mask: the neighbours that shared keys, and their shares for it."""

    peers: dict[int, VectorLayout]
    ciphertexts: dict[int, bytes]


@dataclass(frozen=True)
class UnmaskRequest:
    dropped: tuple[int, ...]
    survivors: tuple[int, ...]


class SecAggServer:
    """The server's side of one instance (pure: the caller carries the messages).

    ``participants`` maps each client id to its vector layout, in the order that
    numbers them (indices from 1); ``total`` is the layout every vector is
    embedded into (the global model's). ``accept_*`` check a client's message and
    keep it (``SecAggRefusal`` with a code otherwise: nothing is kept);
    ``close_*`` end a stage and return the next one's requests, or raise
    ``BelowThreshold``. ``finalize`` returns the unmasked per-element sums.
    Masked inputs are in Z_{2^modulus_bits} (``check_masked``); the server's
    arithmetic runs in Z_{2^32}, which 2^modulus_bits divides, and ``finalize``
    reduces the sums.
    """

    def __init__(
        self,
        context: str,
        participants: Sequence[tuple[str, VectorLayout]],
        total: VectorLayout,
        threshold_fraction: float,
        graph_seed: int,
        minimum: int = 2,
        modulus_bits: int = MODULUS_BITS,
    ) -> None:
        self.context = context
        self.modulus_bits = modulus_bits
        self.index = {client: i for i, (client, _) in enumerate(participants, start=1)}
        self.client = {i: client for client, i in self.index.items()}
        self.layout = {self.index[c]: layout for c, layout in participants}
        self.total = total
        self.fraction = threshold_fraction
        self.graph_seed = graph_seed
        self.minimum = max(2, minimum)
        self.stage = Stage.advertise
        self.keys: dict[int, Advertisement] = {}
        self.graph: dict[int, set[int]] = {}
        self.threshold = 1
        self.shares: dict[int, dict[int, bytes]] = {}  # sender -> receiver -> ciphertext
        self.sharers: set[int] = set()  # U1: shared keys, and enough neighbours hold them
        self.uploaded: set[int] = set()  # U2
        self.plan: dict[int, UnmaskRequest] = {}
        self.revealed: dict[int, dict[int, int]] = {}  # responder -> index -> share
        self._sum = np.zeros(total.size, np.uint32)
        self._seen_keys: set[bytes] = set()

    # -- stage 1 --
    def accept_advertisement(self, client: str, advertisement: Advertisement) -> None:
        i = self._participant(client, Stage.advertise)
        if i in self.keys:
            raise SecAggRefusal(
                "this client advertised its keys already in this round",
                code="duplicate_advertisement",
            )
        check_advertisement(advertisement)
        if {advertisement.c_public, advertisement.s_public} & self._seen_keys:
            raise SecAggRefusal(
                "a public key that was advertised before: keys are fresh every round",
                code="replayed_key",
            )
        self.keys[i] = advertisement
        self._seen_keys |= {advertisement.c_public, advertisement.s_public}

    def close_advertisement(self) -> dict[str, ShareRequest]:
        advertised = sorted(self.keys)
        self._enough(advertised, "advertised keys")
        k = degree_for(len(advertised))
        self.threshold = threshold_for(k, self.fraction)
        self.graph = neighbour_graph(advertised, k, self.graph_seed)
        self.stage = Stage.share
        return {
            self.client[i]: ShareRequest(
                {v: self.keys[v] for v in sorted(self.graph[i])}, self.threshold
            )
            for i in advertised
        }

    # -- stage 2 --
    def accept_shares(self, client: str, shares: Mapping[int, bytes]) -> None:
        i = self._participant(client, Stage.share)
        if i not in self.keys:
            raise SecAggRefusal("this client did not advertise keys", code="not_a_participant")
        if i in self.shares:
            raise SecAggRefusal("this client sent its shares already", code="bad_share")
        check_shares(sorted(self.graph[i]), shares)
        self.shares[i] = dict(shares)

    def close_shares(self) -> dict[str, MaskRequest]:
        alive = set(self.shares)
        while True:  # drop clients whose shares too few others hold, until none is left to drop
            viable = {i for i in alive if len(self.graph[i] & alive) >= self.threshold}
            if viable == alive:
                break
            alive = viable
        self._enough(sorted(alive), "shared keys")
        self.sharers = alive
        self.stage = Stage.masked
        return {
            self.client[i]: MaskRequest(
                {v: self.layout[v] for v in sorted(self.graph[i] & alive)},
                {v: self.shares[v][i] for v in sorted(self.graph[i] & alive)},
            )
            for i in sorted(alive)
        }

    def expected_length(self, client: str) -> int:
        return self.layout[self.index[client]].size

    # -- stage 3 --
    def accept_masked(self, client: str, vector: np.ndarray) -> None:
        i = self._participant(client, Stage.masked)
        if i not in self.sharers:
            raise SecAggRefusal("this client is not in the masked stage", code="not_a_participant")
        if i in self.uploaded:
            raise SecAggRefusal("this client's masked input is in already", code="duplicate_upload")
        check_masked(vector, self.layout[i].size, self.modulus_bits)
        values = vector.astype(np.uint32, copy=False)
        _add_at(self._sum, values, self._positions(self.layout[i]), subtract=False)
        self.uploaded.add(i)

    def close_masked(self) -> dict[str, UnmaskRequest]:
        survivors = self.uploaded
        self._enough(sorted(survivors), "masked inputs")
        dropped = self.sharers - survivors
        # Every secret the server will need must have enough surviving holders, or nothing is
        # asked: the seeds of survivors, the keys of those that dropped after sharing.
        for i in sorted(self.sharers):
            holders = self.graph[i] & survivors
            if len(holders) < self.threshold:
                raise BelowThreshold(
                    f"client {i}'s secrets are held by {len(holders)} surviving neighbours, "
                    f"fewer than the threshold {self.threshold}"
                )
        self.plan = {
            i: UnmaskRequest(
                tuple(sorted(self.graph[i] & dropped)), tuple(sorted(self.graph[i] & survivors))
            )
            for i in sorted(survivors)
        }
        self.stage = Stage.unmask
        return {self.client[i]: request for i, request in self.plan.items()}

    # -- stage 4 --
    def accept_unmask(self, client: str, shares: Mapping[int, int]) -> None:
        i = self._participant(client, Stage.unmask)
        if i not in self.plan:
            raise SecAggRefusal("this client was not asked to unmask", code="not_a_participant")
        if i in self.revealed:
            raise SecAggRefusal(
                "this client answered the unmask request already", code="duplicate_unmask"
            )
        check_unmask(self.plan[i], shares)
        self.revealed[i] = dict(shares)

    def finalize(self) -> np.ndarray:
        """The per-element sums of the survivors' vectors in the ``total`` layout (uint32)."""
        survivors = self.uploaded
        dropped = self.sharers - survivors
        collected: dict[int, dict[int, int]] = {}
        for responder, shares in self.revealed.items():
            for i, value in shares.items():
                collected.setdefault(i, {})[responder] = value
        for i in sorted(self.sharers):
            got = len(collected.get(i, {}))
            if got < self.threshold:
                kind = "key" if i in dropped else "self-mask seed"
                raise BelowThreshold(
                    f"client {i}'s {kind} came back in {got} shares, fewer than the threshold "
                    f"{self.threshold}"
                )
        total = self._sum.copy()
        for i in sorted(survivors):
            seed = combine_shares(_first(collected[i], self.threshold)).to_bytes(32, "big")
            mask = prg(derive_key(seed, "self mask", self.context), self.layout[i].size)
            _add_at(total, mask, self._positions(self.layout[i]), subtract=True)
        for v in sorted(dropped):
            secret = combine_shares(_first(collected[v], self.threshold))
            try:
                key = ec.derive_private_key(secret, ec.SECP256R1())
            except ValueError:
                raise BelowThreshold(f"client {v}'s key does not rebuild") from None
            for w in sorted(self.graph[v] & survivors):
                seed = derive_key(agree(key, self.keys[w].s_public), "pair mask", self.context)
                small = (
                    self.layout[v] if self.layout[v].size <= self.layout[w].size else self.layout[w]
                )
                mask = prg(seed, small.size)
                # w added +mask when w < v, else -mask: take back what w added.
                _add_at(total, mask, self._positions(small), subtract=w < v)
        self.stage = Stage.unmask
        if self.modulus_bits < MODULUS_BITS:
            total &= np.uint32((1 << self.modulus_bits) - 1)
        return total

    # -- helpers --
    def _positions(self, layout: VectorLayout) -> np.ndarray | None:
        """Where a vector of ``layout`` sits in the sums; None: it is the whole of them."""
        return None if layout == self.total else embedding(layout, self.total)

    def _participant(self, client: str, stage: Stage) -> int:
        i = self.index.get(client)
        if i is None:
            raise SecAggRefusal(
                "this client takes no part in this aggregation", code="not_a_participant"
            )
        if stage is not self.stage:
            raise SecAggRefusal(
                f"the aggregation is at its {self.stage.value} stage, not {stage.value}",
                code="round_closed",
            )
        return i

    def _enough(self, clients: Sequence[int], what: str) -> None:
        needed = max(self.minimum, self.threshold)
        if len(clients) < needed:
            raise BelowThreshold(
                f"{len(clients)} clients {what}, fewer than the {needed} secure aggregation needs"
            )


def _first(shares: Mapping[int, int], count: int) -> dict[int, int]:
    return {x: shares[x] for x in sorted(shares)[:count]}


def check_shares(neighbours: Sequence[int], shares: Mapping[int, bytes]) -> None:
    """``SecAggRefusal`` unless ``shares`` holds one ciphertext for each of ``neighbours``."""
    unknown = sorted(set(shares) - set(neighbours))
    if unknown:
        raise SecAggRefusal(
            f"shares for clients {unknown[:5]}, who are not neighbours", code="unknown_peer"
        )
    missing = sorted(set(neighbours) - set(shares))
    if missing:
        raise SecAggRefusal(f"no shares for neighbours {missing[:5]}", code="bad_share")
    for blob in shares.values():
        if len(blob) != 12 + 2 * SHARE_BYTES + 16:
            raise SecAggRefusal("an encrypted share has the wrong size", code="bad_share")


def check_masked(vector: np.ndarray, length: int, modulus_bits: int = MODULUS_BITS) -> None:
    """``SecAggRefusal`` unless ``vector`` is ``length`` elements of Z_{2^modulus_bits}.

    They travel as ``wire_dtype(modulus_bits)``: uint16 up to 16 bits, else uint32.
    """
    dtype = np.dtype(wire_dtype(modulus_bits))
    if vector.dtype != dtype:
        raise SecAggRefusal(
            f"a masked input holds {dtype.name} elements (modulus 2^{modulus_bits}), "
            f"not {vector.dtype}",
            code="bad_modulus",
        )
    if modulus_bits < 8 * dtype.itemsize and vector.size and int(vector.max()) >> modulus_bits:
        raise SecAggRefusal(
            f"a masked input has elements of 2^{modulus_bits} or more (its modulus)",
            code="bad_modulus",
        )
    if vector.shape != (length,):
        raise SecAggRefusal(
            f"the masked input has shape {tuple(vector.shape)}, expected ({length},)",
            code="wrong_length",
        )


def check_unmask(request: UnmaskRequest, shares: Mapping[int, int]) -> None:
    """``SecAggRefusal`` unless ``shares`` answers ``request`` exactly, with field elements."""
    asked = set(request.dropped) | set(request.survivors)
    unknown = sorted(set(shares) - asked)
    if unknown:
        raise SecAggRefusal(
            f"shares of clients {unknown[:5]}, which were not asked", code="unknown_peer"
        )
    missing = sorted(asked - set(shares))
    if missing:
        raise SecAggRefusal(f"no shares of clients {missing[:5]}", code="bad_share")
    if any(not 0 <= value < PRIME for value in shares.values()):
        raise SecAggRefusal("a share lies outside the field", code="bad_share")


# -- what a client's vector holds -------------------------------------------------------------


@dataclass(frozen=True)
class LayoutPlan:
    """How every client of a round lays out its training vector (public: the levels are).

    ``names``: the trainable tensors in order; ``blocks``: per tensor and dimension
    (``Segment.blocks``); ``shapes``: per rate in play, each tensor's slice shape;
    ``label_dims``: the tensors whose rows are labels (the label split: a client
    counts only for the rows of the labels it holds) and that dimension; ``tiers``:
    the rates in play, increasing. With ``classes`` > 0 the vector ends with the
    client's label presence (``classes`` zeros and ones) once per tier at or below
    its rate: summed, tier t counts the clients of rate >= tier t holding each label,
    which is what the classifier rows' counts need, and a smaller client's entries
    are a prefix of a larger one's (the vectors stay nested).
    """

    names: tuple[str, ...]
    blocks: Mapping[str, tuple[int, ...]]
    shapes: Mapping[float, Mapping[str, tuple[int, ...]]]
    label_dims: Mapping[str, int]
    classes: int
    tiers: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON (a secure task carries it to the device)."""
        return {
            "names": list(self.names),
            "blocks": {n: list(b) for n, b in self.blocks.items()},
            "shapes": [
                [rate, {n: list(s) for n, s in shapes.items()}]
                for rate, shapes in self.shapes.items()
            ],
            "label_dims": dict(self.label_dims),
            "classes": self.classes,
            "tiers": list(self.tiers),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LayoutPlan:
        """The plan ``to_json`` wrote; ``SecAggRefusal`` (``bad_share``) if it is not one."""
        try:
            return cls(
                tuple(str(n) for n in data["names"]),
                {str(n): tuple(int(x) for x in b) for n, b in data["blocks"].items()},
                {
                    float(rate): {str(n): tuple(int(x) for x in s) for n, s in shapes.items()}
                    for rate, shapes in data["shapes"]
                },
                {str(n): int(d) for n, d in data["label_dims"].items()},
                int(data["classes"]),
                tuple(float(t) for t in data["tiers"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SecAggRefusal(
                "a secure task's layout plan is malformed", code="bad_share"
            ) from None

    def tiers_held(self, rate: float) -> int:
        return sum(1 for t in self.tiers if t <= rate * (1 + 1e-12))

    def layout(self, rate: float) -> VectorLayout:
        shapes = self._shapes(rate)
        segments = tuple(
            Segment(name, tuple(shapes[name]), tuple(self.blocks[name])) for name in self.names
        )
        presence = self.classes * self.tiers_held(rate) if self.classes else 0
        return VectorLayout(segments, presence)

    def _shapes(self, rate: float) -> Mapping[str, tuple[int, ...]]:
        for known, shapes in self.shapes.items():
            if math.isclose(known, rate, rel_tol=1e-9):
                return shapes
        raise HeteroFLError(f"rate {rate:g} is not a level of this round's layout")


def training_vector(
    update: Mapping[str, np.ndarray],
    plan: LayoutPlan,
    rate: float,
    quantizer: Quantizer,
    labels: Sequence[int] | None,
    rng: SplitMix64 | None = None,
) -> np.ndarray:
    """A client's update (trained minus received) as its vector in Z_{2^32}, before masking.

    Each tensor's slice in the round's fixed point or shared int8 (``quantizer``;
    int8 draws its rounding from ``rng``, tensor after tensor in the plan's order),
    rows of labels it does not hold zeroed (with ``plan.classes``: the label split),
    then its label presence per tier. ``labels`` None: it holds every label.
    """
    layout = plan.layout(rate)
    held = np.ones(max(plan.classes, 1), bool)
    if labels is not None and plan.classes:
        held[:] = False
        held[np.asarray(list(labels), np.int64)] = True
    parts = []
    for segment in layout.segments:
        values = np.asarray(update[segment.name], np.float64)
        if values.shape != segment.shape:
            raise HeteroFLError(
                f"{segment.name} has shape {values.shape}, the layout {segment.shape}"
            )
        dim = plan.label_dims.get(segment.name)
        if dim is not None and plan.classes:
            axis = [-1 if d == dim else 1 for d in range(values.ndim)]
            values = values * held[: values.shape[dim]].reshape(axis)
        parts.append(quantizer.encode(values.reshape(-1), rng))
    if layout.presence:
        parts.append(np.tile(held.astype(np.uint32), layout.presence // plan.classes))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint32)


def statistics_vector(
    statistics: Mapping[str, np.ndarray], layers: Sequence[tuple[str, int]], scale: float
) -> np.ndarray:
    """The sBN statistics as sums, wide-encoded: per layer count, sum and sum of squares.

    ``statistics`` holds LAYER.count, LAYER.mean and LAYER.var (biased), as a
    device computes them; the sums are ``count``, ``count * mean`` and ``count *
    (var + mean^2)`` per channel, in float64, in ``layers`` order.
    """
    values = []
    for name, channels in layers:
        count = float(np.asarray(statistics[f"{name}.count"], np.float64).reshape(-1)[0])
        mean = np.asarray(statistics[f"{name}.mean"], np.float64).reshape(-1)
        var = np.asarray(statistics[f"{name}.var"], np.float64).reshape(-1)
        if mean.shape != (channels,) or var.shape != (channels,):
            raise HeteroFLError(f"statistics of {name} must have {channels} channels")
        values.append(np.concatenate([[count], count * mean, count * (var + mean**2)]))
    return encode_wide(np.concatenate(values) if values else np.zeros(0), scale)


def statistics_layout(layers: Sequence[tuple[str, int]]) -> VectorLayout:
    """Every client's statistics vector: one segment, the same for all (the global level)."""
    size = WIDE_DIGITS * sum(1 + 2 * channels for _, channels in layers)
    return VectorLayout((Segment("statistics", (size,), (0,)),))
